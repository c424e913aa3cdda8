// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The i8042 PS/2 controller: enough for Linux's probe and for a guest-initiated reset.
//!
//! A small model of its own (vm-superio's `I8042Device` reads 0 everywhere, which makes
//! Linux's probe time out): the status register, the controller command byte and RAM, the
//! output port, a 16-byte output buffer, the controller commands Linux uses, and a keyboard
//! that answers the usual commands (reset, identify, LEDs, typematic, scan code set,
//! enable/disable) but never sends key presses. There is no AUX (mouse) port: the AUX
//! commands `0xD3`/`0xD4` are accepted and ignored, as on an AT-type controller, which makes
//! Linux's AUX probe time out once (about half a second) unless the guest's command line has
//! `i8042.noaux`.
//!
//! **Reset**: the reset callback is called when the guest pulses the CPU reset line: command
//! `0xFE` (and the other "pulse output port" commands `0xF0..=0xFE` with bit 0 clear, as on
//! real hardware and in QEMU), or writing the output port (`0xD1`) with bit 0 clear. The
//! callback runs on the vCPU thread after the device's lock is released; it should only
//! signal the VMM (set a flag, write an eventfd).
//!
//! The keyboard interrupt (ISA IRQ 1) is optional: bytes in the output buffer raise it while
//! the command byte enables it. Edge lines get one trigger per byte presented; level lines
//! follow "output buffer full and enabled".
//!
//! Register the device at both [`I8042::ranges`] (ports 0x60 and 0x64, one byte each; port
//! 0x61 belongs to the PIT/speaker).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmkit_device::{BusDevice, BusRange, InterruptLine, TriggerMode};
use vmkit_migration::{MigrationError, Restore, Snapshot, VersionedState};

use crate::{lock, pio_range};

/// The data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The command (write) / status (read) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// ISA IRQ of the keyboard.
pub const KEYBOARD_IRQ: u32 = 1;
/// Bytes the output buffer holds; more are dropped.
pub const OUTPUT_BUFFER_LEN: usize = 16;

const RAM_LEN: usize = 32;

// Status register.
const SR_OBF: u8 = 0x01;
const SR_SYS: u8 = 0x04;
const SR_CMD: u8 = 0x08;
const SR_UNLOCKED: u8 = 0x10;

// Command byte (controller RAM byte 0).
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;
/// As firmware leaves it: keyboard interrupt on, self-test passed, AUX off, translation on.
const DEFAULT_CTR: u8 = CTR_KBD_INT | CTR_SYS | CTR_AUX_DISABLE | CTR_XLATE;

// Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
const OUTPORT_RESET: u8 = 0x01;
const DEFAULT_OUTPORT: u8 = 0xcf;

// Controller commands that take a parameter on the data port.
const CMD_WRITE_OUTPORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;

// Keyboard replies.
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_BAT_OK: u8 = 0xaa;

/// The reset callback.
pub type ResetCallback = Box<dyn Fn() + Send + Sync>;

/// Whether a controller command takes a parameter byte on the data port.
fn takes_parameter(cmd: u8) -> bool {
    matches!(cmd, 0x60..=0x7f | CMD_WRITE_OUTPORT..=CMD_WRITE_AUX)
}

/// Whether a keyboard command takes a parameter byte.
fn keyboard_takes_parameter(cmd: u8) -> bool {
    matches!(cmd, 0xed | 0xf0 | 0xf3)
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Regs {
    ram: [u8; RAM_LEN],
    outport: u8,
    sys: bool,
    last_was_command: bool,
    out: VecDeque<u8>,
    last_out: u8,
    /// Controller command waiting for its parameter (0: none).
    pending: u8,
    /// Keyboard command waiting for its parameter (0: none).
    kbd_pending: u8,
    scanning: bool,
    /// A byte became the head of the output buffer (edge interrupt due).
    presented: bool,
    /// The level last driven on a level-triggered line.
    level: bool,
}

impl Default for Regs {
    fn default() -> Self {
        let mut ram = [0u8; RAM_LEN];
        ram[0] = DEFAULT_CTR;
        Self {
            ram,
            outport: DEFAULT_OUTPORT,
            sys: true,
            last_was_command: false,
            out: VecDeque::with_capacity(OUTPUT_BUFFER_LEN),
            last_out: 0,
            pending: 0,
            kbd_pending: 0,
            scanning: true,
            presented: false,
            level: false,
        }
    }
}

impl Regs {
    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn set_ctr(&mut self, value: u8) {
        let rising = value & CTR_KBD_INT != 0 && self.ctr() & CTR_KBD_INT == 0;
        self.ram[0] = value;
        self.sys = value & CTR_SYS != 0;
        if rising && !self.out.is_empty() {
            self.presented = true;
        }
    }

    fn push(&mut self, byte: u8) {
        if self.out.len() >= OUTPUT_BUFFER_LEN {
            return;
        }
        if self.out.is_empty() {
            self.presented = true;
        }
        self.out.push_back(byte);
    }

    fn status(&self) -> u8 {
        let mut s = SR_UNLOCKED;
        if !self.out.is_empty() {
            s |= SR_OBF;
        }
        if self.sys {
            s |= SR_SYS;
        }
        if self.last_was_command {
            s |= SR_CMD;
        }
        s
    }

    fn read_data(&mut self) -> u8 {
        if let Some(b) = self.out.pop_front() {
            self.last_out = b;
            if !self.out.is_empty() {
                self.presented = true;
            }
        }
        self.last_out
    }

    /// Handles a controller command; returns whether it pulses the reset line.
    fn command(&mut self, cmd: u8) -> bool {
        self.last_was_command = true;
        self.pending = 0;
        match cmd {
            0x20..=0x3f => {
                let v = self.ram[usize::from(cmd & 0x1f)];
                self.push(v);
            }
            c if takes_parameter(c) => self.pending = c,
            0xa7 => {
                let v = self.ctr() | CTR_AUX_DISABLE;
                self.set_ctr(v);
            }
            0xa8 => {
                let v = self.ctr() & !CTR_AUX_DISABLE;
                self.set_ctr(v);
            }
            // AUX interface test: "clock line stuck high", i.e. nothing there.
            0xa9 => self.push(0x02),
            // Controller self-test passed.
            0xaa => {
                self.sys = true;
                self.push(0x55);
            }
            // Keyboard interface test passed.
            0xab => self.push(0x00),
            0xad => {
                let v = self.ctr() | CTR_KBD_DISABLE;
                self.set_ctr(v);
            }
            0xae => {
                let v = self.ctr() & !CTR_KBD_DISABLE;
                self.set_ctr(v);
            }
            // Input port, test inputs.
            0xc0 | 0xe0 => self.push(0x00),
            0xd0 => {
                let v = self.outport;
                self.push(v);
            }
            // Pulse output lines low for the bits clear in the low nibble; bit 0 is reset.
            0xf0..=0xff => return cmd & OUTPORT_RESET == 0,
            _ => {}
        }
        false
    }

    /// Handles a data port write; returns whether it pulls the reset line.
    fn data(&mut self, value: u8) -> bool {
        self.last_was_command = false;
        let pending = std::mem::take(&mut self.pending);
        match pending {
            0x60..=0x7f => {
                let idx = usize::from(pending & 0x1f);
                if idx == 0 {
                    self.set_ctr(value);
                } else if let Some(b) = self.ram.get_mut(idx) {
                    *b = value;
                }
            }
            CMD_WRITE_OUTPORT => {
                self.outport = value;
                return value & OUTPORT_RESET == 0;
            }
            CMD_WRITE_KBD_OUT => self.push(value),
            // No AUX port: the byte goes nowhere.
            CMD_WRITE_AUX_OUT | CMD_WRITE_AUX => {}
            _ => self.keyboard(value),
        }
        false
    }

    fn keyboard(&mut self, value: u8) {
        let translated = self.ctr() & CTR_XLATE != 0;
        let pending = std::mem::take(&mut self.kbd_pending);
        if pending != 0 {
            self.push(KBD_ACK);
            if pending == 0xf0 && value == 0 {
                // Query of the scan code set: set 2 (0x41 through the translator).
                self.push(if translated { 0x41 } else { 0x02 });
            }
            return;
        }
        match value {
            c if keyboard_takes_parameter(c) => {
                self.push(KBD_ACK);
                self.kbd_pending = c;
            }
            0xee => self.push(0xee),
            0xf2 => {
                self.push(KBD_ACK);
                self.push(0xab);
                self.push(if translated { 0x41 } else { 0x83 });
            }
            0xf4 => {
                self.scanning = true;
                self.push(KBD_ACK);
            }
            0xf5 => {
                self.scanning = false;
                self.push(KBD_ACK);
            }
            0xf6..=0xfe => self.push(KBD_ACK),
            0xff => {
                self.scanning = true;
                self.push(KBD_ACK);
                self.push(KBD_BAT_OK);
            }
            _ => self.push(KBD_RESEND),
        }
    }
}

/// The i8042 controller.
pub struct I8042 {
    regs: Mutex<Regs>,
    reset: ResetCallback,
    irq: Option<Arc<dyn InterruptLine>>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("regs", &*lock(&self.regs))
            .field("irq", &self.irq.as_ref().map(|l| l.trigger_mode()))
            .finish()
    }
}

/// What [`I8042`]'s [`Restore`] needs besides the state.
pub struct I8042Args {
    /// Called on a guest reset request.
    pub reset: ResetCallback,
    /// The keyboard interrupt, if wired.
    pub keyboard_irq: Option<Arc<dyn InterruptLine>>,
}

impl std::fmt::Debug for I8042Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042Args")
            .field("keyboard_irq", &self.keyboard_irq.is_some())
            .finish()
    }
}

impl I8042 {
    /// A controller calling `reset` when the guest resets the CPU, without keyboard
    /// interrupt.
    pub fn new(reset: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            regs: Mutex::new(Regs::default()),
            reset: Box::new(reset),
            irq: None,
        }
    }

    /// Wires the keyboard interrupt (ISA IRQ [`KEYBOARD_IRQ`]).
    pub fn with_keyboard_irq(mut self, line: Arc<dyn InterruptLine>) -> Self {
        self.irq = Some(line);
        self
    }

    /// The two one-byte ranges to register: port 0x60 and port 0x64.
    pub fn ranges(&self) -> [BusRange; 2] {
        [
            pio_range(I8042_DATA_PORT, 1),
            pio_range(I8042_COMMAND_PORT, 1),
        ]
    }

    /// Raises the interrupt as the output buffer requires (called with the lock held; the
    /// line implementation does not call back into the device).
    fn update_irq(&self, regs: &mut Regs) {
        let presented = std::mem::take(&mut regs.presented);
        let Some(line) = &self.irq else { return };
        let enabled = regs.ctr() & CTR_KBD_INT != 0;
        let result = match line.trigger_mode() {
            TriggerMode::Edge if presented && enabled && !regs.out.is_empty() => line.trigger(),
            TriggerMode::Edge => Ok(()),
            TriggerMode::Level => {
                let want = enabled && !regs.out.is_empty();
                if want == regs.level {
                    Ok(())
                } else {
                    regs.level = want;
                    line.set_level(want)
                }
            }
        };
        if let Err(e) = result {
            log::warn!("i8042: raising the keyboard interrupt failed: {e}");
        }
    }

    fn port(base: u64, offset: u64) -> Option<u16> {
        base.checked_add(offset).and_then(|p| u16::try_from(p).ok())
    }
}

impl BusDevice for I8042 {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        let mut regs = lock(&self.regs);
        let value = match Self::port(base, offset) {
            Some(I8042_DATA_PORT) => regs.read_data(),
            Some(I8042_COMMAND_PORT) => regs.status(),
            _ => 0xff,
        };
        self.update_irq(&mut regs);
        drop(regs);
        // An 8-bit device: a wider read sees the register in its low byte.
        if let Some((first, rest)) = data.split_first_mut() {
            *first = value;
            rest.fill(0xff);
        }
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let mut regs = lock(&self.regs);
        let reset = match Self::port(base, offset) {
            Some(I8042_DATA_PORT) => regs.data(value),
            Some(I8042_COMMAND_PORT) => regs.command(value),
            _ => false,
        };
        self.update_irq(&mut regs);
        drop(regs);
        if reset {
            (self.reset)();
        }
    }
}

/// The saved state of an [`I8042`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Controller RAM; byte 0 is the command byte.
    pub ram: Vec<u8>,
    /// Output port.
    pub outport: u8,
    /// System flag.
    pub sys: bool,
    /// Whether the last write went to the command port.
    pub last_was_command: bool,
    /// Output buffer, oldest first (at most [`OUTPUT_BUFFER_LEN`]).
    pub output: Vec<u8>,
    /// Last byte read from the data port.
    pub last_output: u8,
    /// Controller command waiting for a parameter (0: none).
    pub pending_command: u8,
    /// Keyboard command waiting for a parameter (0: none).
    pub keyboard_pending: u8,
    /// Whether the keyboard is scanning.
    pub scanning: bool,
}

impl VersionedState for I8042State {
    const NAME: &'static str = "vmkit-devices/i8042";
    const VERSION: u16 = 1;
}

impl Snapshot for I8042 {
    type State = I8042State;

    fn save(&self) -> Result<I8042State, MigrationError> {
        let r = lock(&self.regs);
        Ok(I8042State {
            ram: r.ram.to_vec(),
            outport: r.outport,
            sys: r.sys,
            last_was_command: r.last_was_command,
            output: r.out.iter().copied().collect(),
            last_output: r.last_out,
            pending_command: r.pending,
            keyboard_pending: r.kbd_pending,
            scanning: r.scanning,
        })
    }
}

impl Restore for I8042 {
    type Args = I8042Args;

    fn restore(args: I8042Args, s: &I8042State) -> Result<Self, MigrationError> {
        let invalid = |reason: String| MigrationError::InvalidState {
            name: I8042State::NAME,
            reason,
        };
        let ram: [u8; RAM_LEN] = s.ram.as_slice().try_into().map_err(|_| {
            invalid(format!(
                "controller RAM has {} bytes, expected {RAM_LEN}",
                s.ram.len()
            ))
        })?;
        if s.output.len() > OUTPUT_BUFFER_LEN {
            return Err(invalid(format!(
                "output buffer holds {} bytes, more than {OUTPUT_BUFFER_LEN}",
                s.output.len()
            )));
        }
        if s.pending_command != 0 && !takes_parameter(s.pending_command) {
            return Err(invalid(format!(
                "pending controller command {:#04x} takes no parameter",
                s.pending_command
            )));
        }
        if s.keyboard_pending != 0 && !keyboard_takes_parameter(s.keyboard_pending) {
            return Err(invalid(format!(
                "pending keyboard command {:#04x} takes no parameter",
                s.keyboard_pending
            )));
        }
        let mut regs = Regs {
            ram,
            outport: s.outport,
            sys: s.sys,
            last_was_command: s.last_was_command,
            out: s.output.iter().copied().collect(),
            last_out: s.last_output,
            pending: s.pending_command,
            kbd_pending: s.keyboard_pending,
            scanning: s.scanning,
            presented: !s.output.is_empty(),
            level: false,
        };
        let dev = Self {
            regs: Mutex::new(Regs::default()),
            reset: args.reset,
            irq: args.keyboard_irq,
        };
        dev.update_irq(&mut regs);
        *lock(&dev.regs) = regs;
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use vmkit_device::testing::CountingLine;
    use vmkit_device::Bus;

    struct Rig {
        bus: Bus,
        dev: Arc<I8042>,
        resets: Arc<AtomicU64>,
        irq: Arc<CountingLine>,
    }

    fn rig(mode: TriggerMode) -> Rig {
        let resets = Arc::new(AtomicU64::new(0));
        let r = resets.clone();
        let irq = Arc::new(CountingLine::new(mode));
        let dev = Arc::new(
            I8042::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            })
            .with_keyboard_irq(irq.clone()),
        );
        let bus = Bus::new();
        for range in dev.ranges() {
            bus.insert(range, dev.clone()).unwrap();
        }
        Rig {
            bus,
            dev,
            resets,
            irq,
        }
    }

    impl Rig {
        fn out(&self, port: u64, v: u8) {
            self.bus.write(port, &[v]).unwrap();
        }
        fn inb(&self, port: u64) -> u8 {
            let mut b = [0u8];
            self.bus.read(port, &mut b).unwrap();
            b[0]
        }
        fn resets(&self) -> u64 {
            self.resets.load(Ordering::SeqCst)
        }
        /// Reads the output buffer until it is empty.
        fn drain(&self) -> Vec<u8> {
            let mut v = Vec::new();
            while self.inb(0x64) & SR_OBF != 0 {
                v.push(self.inb(0x60));
            }
            v
        }
    }

    #[test]
    fn reset_fires_once_on_fe_only() {
        let r = rig(TriggerMode::Edge);
        // Every data port value, every command that does not pulse the reset line.
        for v in 0..=255u8 {
            r.out(0x60, v);
        }
        r.drain();
        for cmd in 0..=255u8 {
            let pulses_reset = cmd >= 0xf0 && cmd & 1 == 0;
            if pulses_reset || takes_parameter(cmd) {
                continue;
            }
            r.out(0x64, cmd);
            r.drain();
        }
        // Parameter-taking commands with a parameter that keeps the reset line high.
        for cmd in (0x60..=0x7fu8).chain([0xd1, 0xd2, 0xd3, 0xd4]) {
            r.out(0x64, cmd);
            r.out(0x60, if cmd == 0x60 { DEFAULT_CTR } else { 0xdf });
            r.drain();
        }
        assert_eq!(r.resets(), 0);
        r.out(0x64, 0xfe);
        assert_eq!(r.resets(), 1);
        // Reads never reset.
        for _ in 0..4 {
            r.inb(0x60);
            r.inb(0x64);
        }
        assert_eq!(r.resets(), 1);
    }

    #[test]
    fn output_port_reset_bit() {
        let r = rig(TriggerMode::Edge);
        r.out(0x64, 0xd1);
        r.out(0x60, 0xdf); // A20 on, reset line high
        assert_eq!(r.resets(), 0);
        r.out(0x64, 0xd0);
        assert_eq!(r.drain(), [0xdf]);
        r.out(0x64, 0xd1);
        r.out(0x60, 0xde); // reset line low
        assert_eq!(r.resets(), 1);
    }

    #[test]
    fn linux_probe_sequence() {
        let r = rig(TriggerMode::Edge);
        // i8042_controller_check: status is not 0xff, flushing empties.
        assert_ne!(r.inb(0x64), 0xff);
        assert!(r.drain().is_empty());
        // Read and write back the command byte.
        r.out(0x64, 0x20);
        assert_eq!(r.drain(), [DEFAULT_CTR]);
        r.out(0x64, 0x60);
        assert_ne!(r.inb(0x64) & SR_CMD, 0);
        r.out(0x60, 0x47);
        assert_eq!(r.inb(0x64) & SR_CMD, 0);
        r.out(0x64, 0x20);
        assert_eq!(r.drain(), [0x47]);
        // Self-test and keyboard interface test.
        r.out(0x64, 0xaa);
        assert_eq!(r.drain(), [0x55]);
        r.out(0x64, 0xab);
        assert_eq!(r.drain(), [0x00]);
        // Keyboard: reset, identify, LEDs, unknown.
        r.out(0x60, 0xff);
        assert_eq!(r.drain(), [KBD_ACK, KBD_BAT_OK]);
        r.out(0x60, 0xf2);
        assert_eq!(r.drain(), [KBD_ACK, 0xab, 0x41]);
        r.out(0x60, 0xed);
        r.out(0x60, 0x07);
        assert_eq!(r.drain(), [KBD_ACK, KBD_ACK]);
        r.out(0x60, 0xf0);
        r.out(0x60, 0x00);
        assert_eq!(r.drain(), [KBD_ACK, KBD_ACK, 0x41]);
        r.out(0x60, 0x12);
        assert_eq!(r.drain(), [KBD_RESEND]);
        // Disable/enable bits land in the command byte.
        r.out(0x64, 0xad);
        r.out(0x64, 0xa8);
        r.out(0x64, 0x20);
        assert_eq!(r.drain(), [(0x47 | CTR_KBD_DISABLE) & !CTR_AUX_DISABLE]);
        // AUX loop: no AUX port, nothing comes back.
        r.out(0x64, 0xd3);
        r.out(0x60, 0x5a);
        assert!(r.drain().is_empty());
        // A read of an empty buffer returns the last byte again.
        assert_eq!(r.inb(0x60), 0x47 & !CTR_AUX_DISABLE | CTR_KBD_DISABLE);
    }

    #[test]
    fn keyboard_interrupt_per_byte_when_enabled() {
        let r = rig(TriggerMode::Edge);
        r.out(0x60, 0xf2); // three reply bytes
        assert_eq!(r.irq.count(), 1, "one interrupt for the first byte");
        r.inb(0x60);
        r.inb(0x60);
        assert_eq!(r.irq.count(), 3, "one more per byte presented");
        r.inb(0x60);
        r.inb(0x60);
        assert_eq!(r.irq.count(), 3, "an empty buffer raises nothing");
        // Interrupt disabled in the command byte: nothing; enabling with data pending: one.
        r.out(0x64, 0x60);
        r.out(0x60, DEFAULT_CTR & !CTR_KBD_INT);
        r.out(0x60, 0xee);
        assert_eq!(r.irq.count(), 3);
        r.out(0x64, 0x60);
        r.out(0x60, DEFAULT_CTR);
        assert_eq!(r.irq.count(), 4);
        assert_eq!(r.drain(), [0xee]);
    }

    #[test]
    fn level_line_follows_output_buffer() {
        let r = rig(TriggerMode::Level);
        r.out(0x64, 0xaa);
        assert!(r.irq.level());
        r.inb(0x60);
        assert!(!r.irq.level());
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let r = rig(TriggerMode::Edge);
        let mut big = [0u8; 8];
        r.dev.read(0x60, 0, &mut big);
        r.dev.read(0x60, u64::MAX, &mut big);
        r.dev.read(u64::MAX, 1, &mut big);
        r.dev.read(0x60, 0, &mut []);
        r.dev.write(0x60, 0, &[]);
        r.dev.write(u64::MAX, u64::MAX, &[0xfe]);
        r.dev.write(0x61, 0, &[0xfe]);
        r.dev.write(0x60, 4, &[0xfe]); // 0x64 as base + offset: a real reset
        assert_eq!(r.resets(), 1);
        // The output buffer is bounded.
        for _ in 0..100 {
            r.out(0x64, 0xaa);
        }
        assert_eq!(r.drain().len(), OUTPUT_BUFFER_LEN);
    }

    #[test]
    fn save_restore_round_trip() {
        let r = rig(TriggerMode::Edge);
        r.out(0x64, 0x60);
        r.out(0x60, 0x47);
        r.out(0x60, 0xf2);
        r.inb(0x60);
        r.out(0x64, 0x61); // pending RAM write
        let state = r.dev.save().unwrap();
        let bytes = vmkit_migration::encode(&state).unwrap();
        let back: I8042State = vmkit_migration::decode(&bytes).unwrap();
        assert_eq!(back, state);
        let irq = Arc::new(CountingLine::new(TriggerMode::Edge));
        let dev = I8042::restore(
            I8042Args {
                reset: Box::new(|| {}),
                keyboard_irq: Some(irq.clone()),
            },
            &back,
        )
        .unwrap();
        assert_eq!(irq.count(), 1, "pending output raises the interrupt again");
        assert_eq!(dev.save().unwrap(), state);
        let mut b = [0u8];
        dev.read(0x60, 0, &mut b);
        assert_eq!(b, [0xab]);

        let mut bad = state.clone();
        bad.ram.pop();
        let args = || I8042Args {
            reset: Box::new(|| {}),
            keyboard_irq: None,
        };
        assert!(I8042::restore(args(), &bad).is_err());
        let mut bad = state.clone();
        bad.output = vec![0; OUTPUT_BUFFER_LEN + 1];
        assert!(I8042::restore(args(), &bad).is_err());
        let mut bad = state;
        bad.pending_command = 0xaa;
        assert!(I8042::restore(args(), &bad).is_err());
    }
}
