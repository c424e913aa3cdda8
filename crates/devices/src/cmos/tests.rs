// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Tests of the CMOS RTC and NVRAM.

use std::time::Duration;

use vmkit_device::Bus;

use super::*;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A fake clock the test moves by hand.
#[derive(Clone)]
struct FakeClock(Arc<Mutex<SystemTime>>);

impl FakeClock {
    fn at(secs: u64, nanos: u32) -> Self {
        Self(Arc::new(Mutex::new(
            UNIX_EPOCH + Duration::new(secs, nanos),
        )))
    }
    fn set(&self, secs: u64, nanos: u32) {
        *lock(&self.0) = UNIX_EPOCH + Duration::new(secs, nanos);
    }
    fn clock(&self) -> WallClock {
        let c = self.0.clone();
        Arc::new(move || *lock(&c))
    }
}

struct Rig {
    bus: Bus,
    dev: Arc<Cmos>,
}

impl Rig {
    fn new(dev: Cmos) -> Self {
        let dev = Arc::new(dev);
        let bus = Bus::new();
        bus.insert(dev.range(), dev.clone()).unwrap();
        Self { bus, dev }
    }
    fn get(&self, index: u8) -> u8 {
        self.bus.write(0x70, &[index]).unwrap();
        let mut v = [0u8];
        self.bus.read(0x71, &mut v).unwrap();
        v[0]
    }
    fn set(&self, index: u8, value: u8) {
        self.bus.write(0x70, &[index]).unwrap();
        self.bus.write(0x71, &[value]).unwrap();
    }
    /// Reads the time the way Linux does (`mc146818_get_time`): wait for UIP to clear, read,
    /// and retry when the seconds changed meanwhile. Returns Unix seconds.
    fn read_time_like_linux(&self) -> i64 {
        loop {
            let seconds = self.get(reg::SECONDS);
            if self.get(reg::A) & A_UIP != 0 {
                continue;
            }
            let b = self.get(reg::B);
            let mut regs = [0u8; NVRAM_LEN];
            for r in TIME_REGS {
                regs[usize::from(r)] = self.get(r);
            }
            if self.get(reg::A) & A_UIP != 0 || self.get(reg::SECONDS) != seconds {
                continue;
            }
            return decode_time(&regs, b).expect("the RTC holds a valid time");
        }
    }
}

fn host_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn bcd_time_matches_host_clock() {
    let rig = Rig::new(Cmos::new(512 * MIB, 0));
    assert_eq!(rig.get(reg::B) & (B_BINARY | B_24H), B_24H, "BCD, 24h");
    let before = host_secs();
    let t = rig.read_time_like_linux();
    let after = host_secs();
    assert!(
        t >= before - 2 && t <= after + 2,
        "{before} <= {t} <= {after}"
    );
    // Every register is valid BCD.
    for r in TIME_REGS {
        assert!(from_bcd(rig.get(r)).is_some(), "register {r:#x}");
    }
    assert_eq!(rig.get(reg::CENTURY), 0x20);
}

#[test]
fn binary_time_matches_host_clock() {
    let rig = Rig::new(Cmos::new(512 * MIB, 0));
    rig.set(reg::B, B_BINARY | B_24H);
    let before = host_secs();
    let t = rig.read_time_like_linux();
    let after = host_secs();
    assert!(
        t >= before - 2 && t <= after + 2,
        "{before} <= {t} <= {after}"
    );
    assert_eq!(rig.get(reg::CENTURY), 20);
}

#[test]
fn formats_on_a_fixed_clock() {
    // 2024-03-09 15:04:05 UTC, a Saturday.
    let clock = FakeClock::at(1_709_996_645, 0);
    let rig = Rig::new(Cmos::with_clock(GIB, 0, clock.clock()));
    let regs = |rig: &Rig| TIME_REGS.map(|r| rig.get(r));
    // BCD 24h: sec, min, hour, weekday, day, month, year, century.
    assert_eq!(regs(&rig), [0x05, 0x04, 0x15, 0x07, 0x09, 0x03, 0x24, 0x20]);
    rig.set(reg::B, B_BINARY | B_24H);
    assert_eq!(regs(&rig), [5, 4, 15, 7, 9, 3, 24, 20]);
    // 12-hour: bit 7 is PM.
    rig.set(reg::B, 0);
    assert_eq!(rig.get(reg::HOURS), 0x83);
    rig.set(reg::B, B_BINARY);
    assert_eq!(rig.get(reg::HOURS), 0x83);
    clock.set(1_709_942_400, 0); // 00:00:00 -> 12 AM
    assert_eq!(rig.get(reg::HOURS), 12);
    clock.set(1_709_942_400 + 12 * 3600, 0); // 12:00:00 -> 12 PM
    assert_eq!(rig.get(reg::HOURS), 0x80 | 12);
}

#[test]
fn uip_is_set_just_before_the_second_boundary() {
    let clock = FakeClock::at(1_700_000_000, 500_000_000);
    let rig = Rig::new(Cmos::with_clock(GIB, 0, clock.clock()));
    assert_eq!(rig.get(reg::A), DEFAULT_A);
    clock.set(1_700_000_000, 999_800_000);
    assert_eq!(rig.get(reg::A), DEFAULT_A | A_UIP);
    clock.set(1_700_000_000, 999_755_999);
    assert_eq!(rig.get(reg::A), DEFAULT_A);
    // Updates halted by SET: no update in progress.
    clock.set(1_700_000_000, 999_900_000);
    rig.set(reg::B, B_SET | B_24H);
    assert_eq!(rig.get(reg::A) & A_UIP, 0);
    // UIP is read-only.
    rig.set(reg::B, B_24H);
    clock.set(1_700_000_000, 0);
    rig.set(reg::A, 0xff);
    assert_eq!(rig.get(reg::A), 0x7f);
}

#[test]
fn guest_sets_the_time() {
    let clock = FakeClock::at(1_700_000_000, 0);
    let rig = Rig::new(Cmos::with_clock(GIB, 0, clock.clock()));
    // Linux's mc146818_set_time: SET, write BCD fields, clear SET.
    rig.set(reg::B, B_SET | B_24H);
    let frozen = rig.get(reg::SECONDS);
    clock.set(1_700_000_007, 0);
    assert_eq!(rig.get(reg::SECONDS), frozen, "frozen while SET");
    for (r, v) in [
        (reg::SECONDS, 0x30),
        (reg::MINUTES, 0x20),
        (reg::HOURS, 0x10),
        (reg::DAY, 0x15),
        (reg::MONTH, 0x06),
        (reg::YEAR, 0x30),
        (reg::CENTURY, 0x20),
    ] {
        rig.set(r, v);
    }
    rig.set(reg::B, B_24H);
    let set_at = DateTime {
        year: 2030,
        month: 6,
        day: 15,
        hour: 10,
        minute: 20,
        second: 30,
        weekday: 1,
    }
    .to_unix()
    .unwrap();
    assert_eq!(rig.read_time_like_linux(), set_at);
    assert_eq!(rig.get(reg::WEEKDAY), 0x07, "2030-06-15 is a Saturday");
    // The clock runs on from there.
    clock.set(1_700_000_017, 0);
    assert_eq!(rig.read_time_like_linux(), set_at + 10);
    // Setting one field of the running clock.
    rig.set(reg::MINUTES, 0x45);
    assert_eq!(rig.read_time_like_linux(), set_at + 10 + 25 * 60);
    // An invalid time leaves the clock alone.
    rig.set(reg::B, B_SET | B_24H);
    rig.set(reg::MONTH, 0x13);
    rig.set(reg::B, B_24H);
    assert_eq!(rig.read_time_like_linux(), set_at + 10 + 25 * 60);
}

#[test]
fn memory_registers() {
    let word = |rig: &Rig, r: u8| u16::from_le_bytes([rig.get(r), rig.get(r + 1)]);
    let high = |rig: &Rig| u32::from_le_bytes([rig.get(0x5b), rig.get(0x5c), rig.get(0x5d), 0]);
    // 512 MiB, all below the gap.
    let rig = Rig::new(Cmos::new(512 * MIB, 0));
    assert_eq!(word(&rig, 0x15), 640);
    assert_eq!(word(&rig, 0x17), 0xffff, "capped");
    assert_eq!(word(&rig, 0x30), 0xffff);
    assert_eq!(word(&rig, 0x34), 0x1f00);
    assert_eq!(high(&rig), 0);
    // 3 GiB, all below a gap at 3 GiB.
    let rig = Rig::new(Cmos::new(3 * GIB, 0));
    assert_eq!(word(&rig, 0x34), 0xbf00);
    assert_eq!(high(&rig), 0);
    // 8 GiB: 3 GiB below the gap, 5 GiB above 4 GiB.
    let rig = Rig::new(Cmos::new(3 * GIB, 5 * GIB));
    assert_eq!(word(&rig, 0x34), 0xbf00);
    assert_eq!(high(&rig), 0x01_4000);
    // Small machine: extended memory in KiB, uncapped.
    let rig = Rig::new(Cmos::new(8 * MIB, 0));
    assert_eq!(word(&rig, 0x17), 7 * 1024);
    assert_eq!(word(&rig, 0x34), 0);
    // Checksum over 0x10..=0x2d.
    let sum: u16 = (0x10..=0x2du8).map(|r| u16::from(rig.get(r))).sum();
    assert_eq!(u16::from_be_bytes([rig.get(0x2e), rig.get(0x2f)]), sum);
}

#[test]
fn index_masking_and_status_registers() {
    let rig = Rig::new(Cmos::new(GIB, 0));
    rig.set(0x80 | 0x40, 0x5a);
    assert!(rig.dev.nmi_disabled());
    assert_eq!(rig.get(0x40), 0x5a, "NMI-disable bit masked off the index");
    assert!(!rig.dev.nmi_disabled());
    rig.set(0xff, 0xa5);
    assert_eq!(rig.get(0x7f), 0xa5);
    // The index port reads 0xff.
    let mut v = [0u8];
    rig.bus.read(0x70, &mut v).unwrap();
    assert_eq!(v, [0xff]);
    // C reads 0, D reports valid RAM and time and ignores writes.
    assert_eq!(rig.get(reg::C), 0);
    rig.set(reg::D, 0);
    assert_eq!(rig.get(reg::D), D_VRT);
    // A 2-byte write sets index and data at once.
    rig.bus.write(0x70, &[0x41, 0x77]).unwrap();
    assert_eq!(rig.get(0x41), 0x77);
}

#[test]
fn odd_accesses_do_not_panic() {
    let dev = Cmos::new(GIB, GIB);
    let mut buf = [0u8; 16];
    for offset in [0, 1, 2, 7, u64::MAX - 1, u64::MAX] {
        dev.read(0x70, offset, &mut buf);
        dev.write(0x70, offset, &buf);
        dev.read(0x70, offset, &mut []);
        dev.write(0x70, offset, &[]);
    }
    for index in 0..=255u8 {
        dev.write(0x70, 0, &[index, index]);
        dev.read(0x70, 1, &mut buf[..1]);
    }
}

#[test]
fn save_restore_round_trip() {
    let clock = FakeClock::at(1_700_000_000, 0);
    let rig = Rig::new(Cmos::with_clock(3 * GIB, 5 * GIB, clock.clock()));
    for i in 0x40..0x60u8 {
        rig.set(i, i ^ 0x5a);
    }
    // Move the guest clock one hour ahead.
    rig.set(reg::B, B_SET | B_24H);
    let h = rig.get(reg::HOURS);
    rig.set(reg::HOURS, to_bcd((from_bcd(h).unwrap() + 1) % 24));
    rig.set(reg::B, B_24H);
    let time = rig.read_time_like_linux();
    rig.bus.write(0x70, &[0x45]).unwrap();

    let state = rig.dev.save().unwrap();
    let bytes = vmkit_migration::encode(&state).unwrap();
    let back: CmosState = vmkit_migration::decode(&bytes).unwrap();
    assert_eq!(back, state);
    let restored = Rig::new(Cmos::restore(Some(clock.clock()), &back).unwrap());
    assert_eq!(restored.dev.nvram(), rig.dev.nvram());
    let mut v = [0u8];
    restored.bus.read(0x71, &mut v).unwrap();
    assert_eq!(v[0], 0x45 ^ 0x5a, "selected index restored");
    assert_eq!(restored.read_time_like_linux(), time);
    for i in 0x40..0x60u8 {
        assert_eq!(restored.get(i), i ^ 0x5a);
    }

    let mut bad = state.clone();
    bad.nvram.truncate(64);
    assert!(Cmos::restore(None, &bad).is_err());
    let mut bad = state.clone();
    bad.index = 0x80;
    assert!(Cmos::restore(None, &bad).is_err());
    // Extreme offsets are accepted and read as a valid (clamped) time.
    let mut far = state;
    far.time_offset_secs = i64::MIN;
    let far = Rig::new(Cmos::restore(Some(clock.clock()), &far).unwrap());
    assert_eq!(far.get(reg::CENTURY), 0x00);
    assert_eq!(far.get(reg::YEAR), 0x00);
}
