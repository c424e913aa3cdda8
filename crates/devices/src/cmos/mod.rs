// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The CMOS RTC (MC146818) and its 128 bytes of NVRAM at ports 0x70/0x71.
//!
//! - **Index port 0x70**: the low 7 bits select the register; bit 7 (NMI disable on real
//!   chipsets) is masked off. Reads return 0xFF (the port is write-only).
//! - **Time** (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week, 0x07 day, 0x08 month,
//!   0x09 year, 0x32 century) is computed from the host's wall clock at each read, in UTC,
//!   plus an offset the guest sets by writing the time. Register B selects BCD or binary
//!   (bit 2) and 12- or 24-hour format (bit 1; in 12-hour format bit 7 of the hour is PM).
//!   Setting B's SET bit (7) freezes the registers for the guest to write; clearing it
//!   starts the clock from what was written.
//! - **Register A**: bit 7 (UIP, update in progress) reads as 1 during the last 244 µs before
//!   each second boundary of the (guest) clock, as on the real chip. A guest that waits for
//!   UIP to clear then has at least 244 µs to read a consistent time, and Linux's
//!   "read seconds, check UIP, read, check seconds again" sequence sees a stable second.
//! - **Register C** (interrupt flags) reads 0 and **D** reads 0x80 (valid RAM and time).
//!   There is no RTC interrupt (IRQ 8): periodic, alarm and update-ended interrupts are not
//!   generated; the enable bits in B are stored only.
//! - **Memory size** registers are set from the constructor's RAM sizes, as SeaBIOS and
//!   QEMU expect: 0x15/0x16 base memory (640 KiB), 0x17/0x18 and 0x30/0x31 extended memory
//!   above 1 MiB in KiB (at most 0xFFFF), 0x34/0x35 memory between 16 MiB and the 32-bit gap
//!   in 64 KiB units (at most 0xFFFF), 0x5B..=0x5D memory above 4 GiB in 64 KiB units; the
//!   checksum of 0x10..=0x2D is at 0x2E/0x2F.
//! - Everything else is plain NVRAM, saved and restored with the device.
//!
//! ```
//! use vmkit_device::BusDevice;
//! use vmkit_devices::cmos::Cmos;
//!
//! let cmos = Cmos::new(512 << 20, 0);
//! let mut v = [0u8; 1];
//! cmos.write(0x70, 0, &[0x34]); // memory above 16 MiB, low byte
//! cmos.read(0x70, 1, &mut v);
//! assert_eq!(v[0], 0x00); // (512 - 16) MiB / 64 KiB = 0x1f00
//! cmos.write(0x70, 0, &[0x35]);
//! cmos.read(0x70, 1, &mut v);
//! assert_eq!(v[0], 0x1f);
//! ```

mod calendar;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmkit_device::{BusDevice, BusRange};
use vmkit_migration::{MigrationError, Restore, Snapshot, VersionedState};

use crate::{each_byte, each_byte_mut, lock, pio_range};
use calendar::DateTime;

/// The index port; the data port follows it.
pub const CMOS_PORT: u16 = 0x70;
/// Ports to register (index and data).
pub const CMOS_PORT_LEN: u16 = 2;
/// Bytes of NVRAM (including the RTC registers).
pub const NVRAM_LEN: usize = 128;

/// A source of wall-clock time (the host clock, or a fake one in tests).
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The host's clock.
pub fn host_clock() -> WallClock {
    Arc::new(SystemTime::now)
}

/// Register indices.
pub mod reg {
    /// Seconds.
    pub const SECONDS: u8 = 0x00;
    /// Seconds alarm.
    pub const SECONDS_ALARM: u8 = 0x01;
    /// Minutes.
    pub const MINUTES: u8 = 0x02;
    /// Hours.
    pub const HOURS: u8 = 0x04;
    /// Day of week, 1 = Sunday.
    pub const WEEKDAY: u8 = 0x06;
    /// Day of month.
    pub const DAY: u8 = 0x07;
    /// Month.
    pub const MONTH: u8 = 0x08;
    /// Year within the century.
    pub const YEAR: u8 = 0x09;
    /// Status register A (UIP, divider, rate).
    pub const A: u8 = 0x0a;
    /// Status register B (SET, interrupt enables, data mode, 24h).
    pub const B: u8 = 0x0b;
    /// Status register C (interrupt flags).
    pub const C: u8 = 0x0c;
    /// Status register D (valid RAM and time).
    pub const D: u8 = 0x0d;
    /// Base memory in KiB, low byte (high byte at 0x16).
    pub const BASE_MEM_LOW: u8 = 0x15;
    /// Extended memory above 1 MiB in KiB, low byte (high byte at 0x18).
    pub const EXT_MEM_LOW: u8 = 0x17;
    /// Checksum of 0x10..=0x2D, high byte (low byte at 0x2F).
    pub const CHECKSUM_HIGH: u8 = 0x2e;
    /// Extended memory above 1 MiB in KiB, low byte, second copy (high byte at 0x31).
    pub const EXT_MEM2_LOW: u8 = 0x30;
    /// Century.
    pub const CENTURY: u8 = 0x32;
    /// Memory above 16 MiB (below the 32-bit gap) in 64 KiB units, low byte (high at 0x35).
    pub const MEM_ABOVE_16M_LOW: u8 = 0x34;
    /// Memory above 4 GiB in 64 KiB units, low byte (then 0x5C, 0x5D).
    pub const MEM_ABOVE_4G_LOW: u8 = 0x5b;
}

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const D_VRT: u8 = 0x80;
/// 32.768 kHz time base, 1024 Hz periodic rate: what firmware leaves.
const DEFAULT_A: u8 = 0x26;
const DEFAULT_B: u8 = B_24H;
/// UIP is set this long before each update.
const UIP_WINDOW_NS: u32 = 244_000;

const TIME_REGS: [u8; 8] = [
    reg::SECONDS,
    reg::MINUTES,
    reg::HOURS,
    reg::WEEKDAY,
    reg::DAY,
    reg::MONTH,
    reg::YEAR,
    reg::CENTURY,
];

fn is_time_reg(index: u8) -> bool {
    TIME_REGS.contains(&index)
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> Option<u8> {
    let (hi, lo) = (v >> 4, v & 0xf);
    (hi <= 9 && lo <= 9).then_some(hi * 10 + lo)
}

/// Writes the RTC time registers for `secs` in the format register B selects.
fn encode_time(nvram: &mut [u8; NVRAM_LEN], secs: i64) {
    let b = nvram[usize::from(reg::B)];
    let enc = |v: u8| if b & B_BINARY != 0 { v } else { to_bcd(v) };
    let t = DateTime::from_unix(secs);
    let year = t.year.clamp(0, 9999);
    let hour = if b & B_24H != 0 {
        enc(t.hour)
    } else {
        let h12 = match t.hour % 12 {
            0 => 12,
            h => h,
        };
        enc(h12) | if t.hour >= 12 { 0x80 } else { 0 }
    };
    // `year` is 0..=9999, so both parts fit a byte.
    let (century, yy) = ((year / 100) as u8, (year % 100) as u8);
    for (index, value) in [
        (reg::SECONDS, enc(t.second)),
        (reg::MINUTES, enc(t.minute)),
        (reg::HOURS, hour),
        (reg::WEEKDAY, enc(t.weekday)),
        (reg::DAY, enc(t.day)),
        (reg::MONTH, enc(t.month)),
        (reg::YEAR, enc(yy)),
        (reg::CENTURY, enc(century)),
    ] {
        nvram[usize::from(index)] = value;
    }
}

/// Reads the RTC time registers as seconds since the epoch; `None` if they do not hold a
/// valid time in the format register B selects.
fn decode_time(nvram: &[u8; NVRAM_LEN], b: u8) -> Option<i64> {
    let dec = |index: u8| {
        let v = nvram[usize::from(index)];
        if b & B_BINARY != 0 {
            Some(v)
        } else {
            from_bcd(v)
        }
    };
    let raw_hour = nvram[usize::from(reg::HOURS)];
    let hour = if b & B_24H != 0 {
        dec(reg::HOURS)?
    } else {
        let pm = raw_hour & 0x80 != 0;
        let h = if b & B_BINARY != 0 {
            raw_hour & 0x7f
        } else {
            from_bcd(raw_hour & 0x7f)?
        };
        if !(1..=12).contains(&h) {
            return None;
        }
        h % 12 + if pm { 12 } else { 0 }
    };
    let century = dec(reg::CENTURY)?;
    let yy = dec(reg::YEAR)?;
    if century > 99 || yy > 99 {
        return None;
    }
    DateTime {
        year: i64::from(century) * 100 + i64::from(yy),
        month: dec(reg::MONTH)?,
        day: dec(reg::DAY)?,
        hour,
        minute: dec(reg::MINUTES)?,
        second: dec(reg::SECONDS)?,
        weekday: 1,
    }
    .to_unix()
}

fn put16(nvram: &mut [u8; NVRAM_LEN], index: u8, value: u64) {
    let [lo, hi, ..] = value.to_le_bytes();
    nvram[usize::from(index)] = lo;
    nvram[usize::from(index) + 1] = hi;
}

fn update_checksum(nvram: &mut [u8; NVRAM_LEN]) {
    let sum: u16 = nvram[0x10..=0x2d].iter().map(|&b| u16::from(b)).sum();
    let [hi, lo] = sum.to_be_bytes();
    nvram[usize::from(reg::CHECKSUM_HIGH)] = hi;
    nvram[usize::from(reg::CHECKSUM_HIGH) + 1] = lo;
}

/// Sets the memory size registers for `below_4g` bytes of RAM from address 0 up to the
/// 32-bit gap and `above_4g` bytes from 4 GiB.
fn set_memory_registers(nvram: &mut [u8; NVRAM_LEN], below_4g: u64, above_4g: u64) {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    put16(nvram, reg::BASE_MEM_LOW, 640);
    let ext = (below_4g.saturating_sub(MIB) / KIB).min(0xffff);
    put16(nvram, reg::EXT_MEM_LOW, ext);
    put16(nvram, reg::EXT_MEM2_LOW, ext);
    let above_16m = (below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xffff);
    put16(nvram, reg::MEM_ABOVE_16M_LOW, above_16m);
    let high = (above_4g / (64 * KIB)).min(0xff_ffff);
    let [b0, b1, b2, ..] = high.to_le_bytes();
    let base = usize::from(reg::MEM_ABOVE_4G_LOW);
    nvram[base] = b0;
    nvram[base + 1] = b1;
    nvram[base + 2] = b2;
    update_checksum(nvram);
}

#[derive(Clone, Debug)]
struct Inner {
    index: u8,
    nmi_disabled: bool,
    nvram: [u8; NVRAM_LEN],
    /// Guest time minus host time, in seconds.
    offset: i64,
}

/// The CMOS RTC and NVRAM device.
pub struct Cmos {
    inner: Mutex<Inner>,
    clock: WallClock,
}

impl std::fmt::Debug for Cmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmos")
            .field("inner", &*lock(&self.inner))
            .finish()
    }
}

impl Cmos {
    /// A CMOS with the host clock, for a guest with `mem_below_4g` bytes of RAM below the
    /// 32-bit gap (including the first MiB) and `mem_above_4g` bytes from 4 GiB up.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        Self::with_clock(mem_below_4g, mem_above_4g, host_clock())
    }

    /// Like [`Cmos::new`] with another clock.
    pub fn with_clock(mem_below_4g: u64, mem_above_4g: u64, clock: WallClock) -> Self {
        let mut nvram = [0u8; NVRAM_LEN];
        nvram[usize::from(reg::A)] = DEFAULT_A;
        nvram[usize::from(reg::B)] = DEFAULT_B;
        nvram[usize::from(reg::D)] = D_VRT;
        set_memory_registers(&mut nvram, mem_below_4g, mem_above_4g);
        Self {
            inner: Mutex::new(Inner {
                index: 0,
                nmi_disabled: false,
                nvram,
                offset: 0,
            }),
            clock,
        }
    }

    /// The ports to register: 0x70 and 0x71.
    pub fn range(&self) -> BusRange {
        pio_range(CMOS_PORT, CMOS_PORT_LEN)
    }

    /// A copy of the NVRAM as stored (the time registers hold the last frozen time, not the
    /// current one).
    pub fn nvram(&self) -> [u8; NVRAM_LEN] {
        lock(&self.inner).nvram
    }

    /// Whether the guest last wrote the index port with the NMI-disable bit set.
    pub fn nmi_disabled(&self) -> bool {
        lock(&self.inner).nmi_disabled
    }

    /// Host seconds since the epoch and nanoseconds into the second.
    fn now(&self) -> (i64, u32) {
        match (self.clock)().duration_since(UNIX_EPOCH) {
            Ok(d) => (
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                d.subsec_nanos(),
            ),
            // A clock before 1970: count it as the epoch.
            Err(_) => (0, 0),
        }
    }

    fn read_data(&self, s: &mut Inner) -> u8 {
        let index = s.index;
        let b = s.nvram[usize::from(reg::B)];
        match index {
            reg::A => {
                let mut v = s.nvram[usize::from(reg::A)] & !A_UIP;
                if b & B_SET == 0 && self.now().1 >= 1_000_000_000 - UIP_WINDOW_NS {
                    v |= A_UIP;
                }
                v
            }
            reg::C => std::mem::take(&mut s.nvram[usize::from(reg::C)]),
            reg::D => D_VRT,
            i if is_time_reg(i) && b & B_SET == 0 => {
                let mut regs = s.nvram;
                encode_time(&mut regs, self.now().0.saturating_add(s.offset));
                regs[usize::from(i)]
            }
            i => s.nvram[usize::from(i & 0x7f)],
        }
    }

    fn write_data(&self, s: &mut Inner, value: u8) {
        let index = s.index;
        let old_b = s.nvram[usize::from(reg::B)];
        match index {
            reg::A => s.nvram[usize::from(reg::A)] = value & !A_UIP,
            reg::B => {
                s.nvram[usize::from(reg::B)] = value;
                let (was_set, is_set) = (old_b & B_SET != 0, value & B_SET != 0);
                if !was_set && is_set {
                    // Freeze: the registers hold the current time, in the new format.
                    let now = self.now().0.saturating_add(s.offset);
                    encode_time(&mut s.nvram, now);
                } else if was_set && !is_set {
                    // Run from what the guest wrote (in the format it was written in).
                    match decode_time(&s.nvram, old_b) {
                        Some(t) => s.offset = t.saturating_sub(self.now().0),
                        None => log::debug!("cmos: guest set an invalid time; clock unchanged"),
                    }
                }
            }
            reg::C | reg::D => {}
            i if is_time_reg(i) => {
                if old_b & B_SET != 0 {
                    s.nvram[usize::from(i)] = value;
                } else if i != reg::WEEKDAY {
                    // A running clock set field by field.
                    let now = self.now().0;
                    let mut regs = s.nvram;
                    encode_time(&mut regs, now.saturating_add(s.offset));
                    regs[usize::from(i)] = value;
                    if let Some(t) = decode_time(&regs, old_b) {
                        s.offset = t.saturating_sub(now);
                    }
                }
            }
            i => s.nvram[usize::from(i & 0x7f)] = value,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        let mut s = lock(&self.inner);
        each_byte_mut(offset, data, |off, b| {
            *b = match off {
                1 => self.read_data(&mut s),
                _ => 0xff,
            };
        });
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        let mut s = lock(&self.inner);
        each_byte(offset, data, |off, value| match off {
            0 => {
                s.index = value & 0x7f;
                s.nmi_disabled = value & 0x80 != 0;
            }
            1 => self.write_data(&mut s, value),
            _ => {}
        });
    }
}

/// The saved state of a [`Cmos`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// The selected register.
    pub index: u8,
    /// The NMI-disable bit last written to the index port.
    pub nmi_disabled: bool,
    /// The NVRAM ([`NVRAM_LEN`] bytes).
    pub nvram: Vec<u8>,
    /// Guest RTC time minus host wall-clock time, in seconds (any value is valid: the time
    /// arithmetic saturates, and years outside 0..=9999 read as the nearest of them).
    pub time_offset_secs: i64,
}

impl VersionedState for CmosState {
    const NAME: &'static str = "vmkit-devices/cmos";
    const VERSION: u16 = 1;
}

impl Snapshot for Cmos {
    type State = CmosState;

    fn save(&self) -> Result<CmosState, MigrationError> {
        let s = lock(&self.inner);
        Ok(CmosState {
            index: s.index,
            nmi_disabled: s.nmi_disabled,
            nvram: s.nvram.to_vec(),
            time_offset_secs: s.offset,
        })
    }
}

impl Restore for Cmos {
    /// The clock to use; `None` for the host clock.
    type Args = Option<WallClock>;

    fn restore(clock: Option<WallClock>, state: &CmosState) -> Result<Self, MigrationError> {
        let invalid = |reason: String| MigrationError::InvalidState {
            name: CmosState::NAME,
            reason,
        };
        let nvram: [u8; NVRAM_LEN] = state.nvram.as_slice().try_into().map_err(|_| {
            invalid(format!(
                "NVRAM has {} bytes, expected {NVRAM_LEN}",
                state.nvram.len()
            ))
        })?;
        if state.index >= 0x80 {
            return Err(invalid(format!(
                "register index {:#x} is beyond the NVRAM",
                state.index
            )));
        }
        Ok(Self {
            inner: Mutex::new(Inner {
                index: state.index,
                nmi_disabled: state.nmi_disabled,
                nvram,
                offset: state.time_offset_secs,
            }),
            clock: clock.unwrap_or_else(host_clock),
        })
    }
}

#[cfg(test)]
mod tests;
