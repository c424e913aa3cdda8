// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The root complex: bus 0, bridges, configuration access and BAR mapping.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use vmkit_device::{Bus, BusDevice, BusRange};

use crate::slots::SlotAllocator;
use crate::{
    BarChange, PciAddress, PciBarKind, PciBarRegion, PciBridge, PciDevice, PciError, PciHostBridge,
    SlotPlan, SlotRole, ECAM_BASE, ECAM_SIZE,
};

/// First port of the legacy configuration mechanism (`CONFIG_ADDRESS`).
pub const PCI_CONFIG_IO_BASE: u64 = 0xcf8;
/// Ports covered by [`PciConfigIo`] (`0xCF8..0xD00`).
pub const PCI_CONFIG_IO_SIZE: u64 = 8;

/// Routes bus accesses of one BAR to its function.
struct BarHandler {
    dev: Arc<dyn PciDevice>,
    bar: u8,
}

impl BusDevice for BarHandler {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        self.dev.bar_read(self.bar, offset, data);
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        self.dev.bar_write(self.bar, offset, data);
    }
}

struct Function {
    dev: Arc<dyn PciDevice>,
    /// The bus 0 slot whose area holds this function's BARs.
    top_slot: u8,
    /// What the slot allocator handed out for it: (kind, address, size).
    allocated: Vec<(PciBarKind, u64, u64)>,
}

struct BridgeLink {
    /// Where the bridge sits (its primary side).
    at: PciAddress,
    bridge: Arc<PciBridge>,
}

#[derive(Default)]
struct State {
    /// Functions by their address as added (bus numbers as given at add time).
    functions: BTreeMap<PciAddress, Function>,
    /// Bridges by the bus number given to their secondary side at add time.
    bridges: BTreeMap<u8, BridgeLink>,
    allocators: HashMap<u8, SlotAllocator>,
    /// What is registered on the buses: (function, BAR index) -> region.
    mapped: BTreeMap<(PciAddress, u8), PciBarRegion>,
}

/// The PCI root complex of one segment: bus 0 with the host bridge at 00:00.0, bridges to
/// further buses, and the mapping of decoded BARs onto the MMIO and PIO [`Bus`]es.
///
/// Bus numbers in the [`PciAddress`]es passed to [`PciRoot::add_device`] and
/// [`PciRoot::add_bridge`] are those firmware gives the bridges; configuration cycles
/// follow whatever the guest programs later. After every configuration write that changes
/// what a function decodes (or any write to a bridge), the root recomputes the decoded BARs
/// of every function and updates the buses: a BAR that would overlap another range (a BAR
/// moved on top of another, or onto a platform device) is logged and left unmapped, until a
/// later change lets it fit. [`PciDevice::bar_moved`] is called with what actually changed
/// on the bus.
///
/// ```
/// use std::sync::Arc;
/// use vmkit_device::Bus;
/// use vmkit_pci::{PciRoot, SlotPlan, ECAM_BASE};
///
/// let mmio = Arc::new(Bus::new());
/// let pio = Arc::new(Bus::new());
/// let root = PciRoot::new(SlotPlan::default(), mmio.clone(), pio.clone());
/// root.register_config_access()?;
/// // Vendor/device ID of the host bridge through ECAM.
/// let mut id = [0u8; 4];
/// mmio.read(ECAM_BASE, &mut id).unwrap();
/// assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
/// # Ok::<(), vmkit_pci::PciError>(())
/// ```
pub struct PciRoot {
    plan: SlotPlan,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    host_bridge: Arc<PciHostBridge>,
    state: Mutex<State>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("PciRoot")
            .field("plan", &self.plan)
            .field("functions", &s.functions.keys().collect::<Vec<_>>())
            .field("mapped", &s.mapped)
            .finish_non_exhaustive()
    }
}

fn host_bridge_addr() -> PciAddress {
    PciAddress {
        bus: 0,
        device: 0,
        function: 0,
    }
}

impl PciRoot {
    /// A root complex whose BARs go on `mmio` / `pio`, with the host bridge at 00:00.0.
    pub fn new(plan: SlotPlan, mmio: Arc<Bus>, pio: Arc<Bus>) -> Arc<Self> {
        Self::with_host_bridge(plan, mmio, pio, Arc::new(PciHostBridge::new()))
    }

    /// Like [`PciRoot::new`] with a given (e.g. restored) host bridge.
    pub fn with_host_bridge(
        plan: SlotPlan,
        mmio: Arc<Bus>,
        pio: Arc<Bus>,
        host_bridge: Arc<PciHostBridge>,
    ) -> Arc<Self> {
        let mut state = State::default();
        state.functions.insert(
            host_bridge_addr(),
            Function {
                dev: host_bridge.clone(),
                top_slot: 0,
                allocated: Vec::new(),
            },
        );
        Arc::new(Self {
            plan,
            mmio,
            pio,
            host_bridge,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slot plan.
    pub fn plan(&self) -> &SlotPlan {
        &self.plan
    }

    /// The host bridge at 00:00.0.
    pub fn host_bridge(&self) -> &Arc<PciHostBridge> {
        &self.host_bridge
    }

    /// Registers [`PciConfigIo`] at ports `0xCF8..0xD00` and [`PciEcam`] at
    /// [`ECAM_BASE`]..+[`ECAM_SIZE`].
    pub fn register_config_access(self: &Arc<Self>) -> Result<(), PciError> {
        self.pio.insert(
            BusRange::new(PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_SIZE)?,
            Arc::new(PciConfigIo::new(self)),
        )?;
        if let Err(e) = self.mmio.insert(
            BusRange::new(ECAM_BASE, ECAM_SIZE)?,
            Arc::new(PciEcam::new(self)),
        ) {
            if let Err(re) = self.pio.remove(PCI_CONFIG_IO_BASE) {
                log::warn!("PCI: cannot undo the CF8 registration: {re}");
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Whether bus number `bus` (as given at add time) exists: bus 0 or a bridge's.
    fn bus_exists(state: &State, bus: u8) -> bool {
        bus == 0 || state.bridges.contains_key(&bus)
    }

    /// The bus 0 slot above `addr`.
    fn top_slot(state: &State, addr: PciAddress) -> u8 {
        let mut a = addr;
        for _ in 0..256 {
            if a.bus == 0 {
                return a.device;
            }
            match state.bridges.get(&a.bus) {
                Some(l) => a = l.at,
                None => break,
            }
        }
        a.device
    }

    fn check_new(state: &State, addr: PciAddress) -> Result<(), PciError> {
        PciAddress::new(addr.bus, addr.device, addr.function)?;
        if !Self::bus_exists(state, addr.bus) {
            return Err(PciError::NoSuchBus(addr.bus));
        }
        if state.functions.contains_key(&addr) {
            return Err(PciError::AddressInUse(addr));
        }
        Ok(())
    }

    fn allocator<'a>(
        &self,
        state: &'a mut State,
        slot: u8,
    ) -> Result<&'a mut SlotAllocator, PciError> {
        match state.allocators.entry(slot) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                Ok(e.insert(SlotAllocator::new(&self.plan, slot)?))
            }
        }
    }

    /// Adds a function at `addr` as firmware would: its BARs ([`PciDevice::bar_info`]) get
    /// addresses in the slot plan's area for the slot (for a device behind a bridge, the
    /// area of the bridge's slot on bus 0), memory and I/O decoding are enabled, and the
    /// decoded BARs are mapped. Returns the BARs as mapped.
    ///
    /// A function other than 0 is only found by guests that see function 0 of the same
    /// device, and function 0 must then set the multi-function bit itself.
    pub fn add_device(
        &self,
        addr: PciAddress,
        dev: Arc<dyn PciDevice>,
    ) -> Result<Vec<PciBarRegion>, PciError> {
        let mut state = self.lock();
        Self::check_new(&state, addr)?;
        let top = Self::top_slot(&state, addr);
        let info = dev.bar_info();
        if addr.bus != 0 && info.iter().any(|b| b.kind == PciBarKind::Io) {
            return Err(PciError::BarAllocation {
                addr,
                reason: "bridges do not forward I/O: no I/O BARs behind a bridge".into(),
            });
        }
        let placed = self.allocator(&mut state, top)?.allocate(addr, &info)?;
        let allocated: Vec<(PciBarKind, u64, u64)> = info
            .iter()
            .filter_map(|b| {
                placed
                    .iter()
                    .find(|(i, _)| *i == b.index)
                    .map(|(_, a)| (b.kind, *a, b.size))
            })
            .collect();
        for (index, a) in &placed {
            if let Err(e) = dev.set_bar_address(*index, *a) {
                self.allocator(&mut state, top)?.free(&allocated);
                return Err(e);
            }
        }
        let mut enable = 0u16;
        if info.iter().any(|b| b.kind == PciBarKind::Io) {
            enable |= 1;
        }
        if info.iter().any(|b| b.kind != PciBarKind::Io) {
            enable |= 2;
        }
        if enable != 0 {
            let mut cmd = [0u8; 2];
            dev.config_read(4, &mut cmd);
            let cmd = u16::from_le_bytes(cmd) | enable;
            dev.config_write(4, &cmd.to_le_bytes());
        }
        state.functions.insert(
            addr,
            Function {
                dev,
                top_slot: top,
                allocated,
            },
        );
        self.resync(&mut state);
        Ok(Self::mapped_of(&state, addr))
    }

    /// Adds the device for `role` at its slot plan address (function 0 on bus 0); returns
    /// the address.
    pub fn add_role(
        &self,
        role: SlotRole,
        dev: Arc<dyn PciDevice>,
    ) -> Result<PciAddress, PciError> {
        let addr = self.plan.address(role)?;
        if role == SlotRole::HostBridge {
            return Err(PciError::AddressInUse(addr));
        }
        self.add_device(addr, dev)?;
        Ok(addr)
    }

    /// Adds a function whose BARs and command register are already programmed (restored
    /// from a snapshot): nothing is assigned, its decoded BARs are mapped as they are.
    pub fn attach_device(&self, addr: PciAddress, dev: Arc<dyn PciDevice>) -> Result<(), PciError> {
        let mut state = self.lock();
        Self::check_new(&state, addr)?;
        let top = Self::top_slot(&state, addr);
        // Keep the slot allocator from handing the restored BARs out again.
        let mut allocated = Vec::new();
        for r in dev.bars() {
            if self
                .allocator(&mut state, top)?
                .reserve(r.kind, r.addr, r.size)
            {
                allocated.push((r.kind, r.addr, r.size));
            }
        }
        state.functions.insert(
            addr,
            Function {
                dev,
                top_slot: top,
                allocated,
            },
        );
        self.resync(&mut state);
        Ok(())
    }

    /// Recomputes every function's decoded BARs and retries mapping the ones left
    /// unmapped (e.g. after the VMM removed a platform device they overlapped).
    pub fn remap(&self) {
        let mut state = self.lock();
        self.resync(&mut state);
    }

    /// Adds a PCI-to-PCI bridge at `addr` whose secondary bus gets number `secondary_bus`,
    /// programmed as firmware would (bus numbers, memory window = the area of its slot on
    /// bus 0, forwarding enabled; ancestors' subordinate bus numbers raised). Devices are
    /// then added at `secondary_bus:dd.f`.
    pub fn add_bridge(
        &self,
        addr: PciAddress,
        secondary_bus: u8,
    ) -> Result<Arc<PciBridge>, PciError> {
        let bridge = Arc::new(PciBridge::new());
        let mut state = self.lock();
        Self::check_new(&state, addr)?;
        if secondary_bus == 0
            || secondary_bus <= addr.bus
            || state.bridges.contains_key(&secondary_bus)
        {
            return Err(PciError::InvalidAddress(PciAddress {
                bus: secondary_bus,
                device: 0,
                function: 0,
            }));
        }
        let top = Self::top_slot(&state, addr);
        bridge.preset(
            addr.bus,
            secondary_bus,
            secondary_bus,
            self.plan.mmio_area(top),
        );
        // Raise the subordinate bus number of every bridge above.
        let mut up = addr.bus;
        for _ in 0..256 {
            if up == 0 {
                break;
            }
            let Some(link) = state.bridges.get(&up) else {
                break;
            };
            if link.bridge.subordinate_bus() < secondary_bus {
                link.bridge.set_subordinate(secondary_bus);
            }
            up = link.at.bus;
        }
        self.insert_bridge(&mut state, addr, secondary_bus, Arc::clone(&bridge));
        Ok(bridge)
    }

    /// Adds a bridge restored from a snapshot, as it was programmed; `secondary_bus` is
    /// the number it had when first added (what devices behind it were added with).
    pub fn attach_bridge(
        &self,
        addr: PciAddress,
        secondary_bus: u8,
        bridge: Arc<PciBridge>,
    ) -> Result<(), PciError> {
        let mut state = self.lock();
        Self::check_new(&state, addr)?;
        if secondary_bus == 0 || state.bridges.contains_key(&secondary_bus) {
            return Err(PciError::NoSuchBus(secondary_bus));
        }
        self.insert_bridge(&mut state, addr, secondary_bus, bridge);
        Ok(())
    }

    fn insert_bridge(
        &self,
        state: &mut State,
        addr: PciAddress,
        secondary: u8,
        bridge: Arc<PciBridge>,
    ) {
        let top = Self::top_slot(state, addr);
        state.functions.insert(
            addr,
            Function {
                dev: bridge.clone(),
                top_slot: top,
                allocated: Vec::new(),
            },
        );
        state
            .bridges
            .insert(secondary, BridgeLink { at: addr, bridge });
        self.resync(state);
    }

    /// Removes the endpoint at `addr`: unmaps its BARs (calling
    /// [`PciDevice::bar_moved`]) and returns its BAR areas to the slot allocator. The host
    /// bridge and bridges cannot be removed.
    pub fn remove_device(&self, addr: PciAddress) -> Result<Arc<dyn PciDevice>, PciError> {
        let mut state = self.lock();
        if addr == host_bridge_addr() || state.bridges.values().any(|l| l.at == addr) {
            return Err(PciError::InvalidAddress(addr));
        }
        let was_mapped = Self::mapped_of(&state, addr);
        let f = state
            .functions
            .remove(&addr)
            .ok_or(PciError::InvalidAddress(addr))?;
        self.resync(&mut state);
        for r in was_mapped {
            f.dev.bar_moved(&BarChange {
                old: Some(r),
                new: None,
            });
        }
        if let Some(a) = state.allocators.get_mut(&f.top_slot) {
            a.free(&f.allocated);
        }
        Ok(f.dev)
    }

    /// The function at `addr` (bus number as added).
    pub fn device(&self, addr: PciAddress) -> Option<Arc<dyn PciDevice>> {
        self.lock().functions.get(&addr).map(|f| Arc::clone(&f.dev))
    }

    /// All functions, by address as added.
    pub fn devices(&self) -> Vec<(PciAddress, Arc<dyn PciDevice>)> {
        self.lock()
            .functions
            .iter()
            .map(|(a, f)| (*a, Arc::clone(&f.dev)))
            .collect()
    }

    /// The BARs currently registered on the buses for the function at `addr`.
    pub fn mapped_bars(&self, addr: PciAddress) -> Vec<PciBarRegion> {
        Self::mapped_of(&self.lock(), addr)
    }

    fn mapped_of(state: &State, addr: PciAddress) -> Vec<PciBarRegion> {
        state
            .mapped
            .range((addr, 0)..=(addr, u8::MAX))
            .map(|(_, r)| *r)
            .collect()
    }

    /// Resolves a bus number as the guest programmed it to a bus number as added.
    fn route(state: &State, bus: u8) -> Option<u8> {
        if bus == 0 {
            return Some(0);
        }
        let mut current = 0u8;
        for _ in 0..256 {
            let next = state.bridges.iter().find(|(_, l)| {
                l.at.bus == current
                    && l.bridge.secondary_bus() != 0
                    && (l.bridge.secondary_bus()..=l.bridge.subordinate_bus()).contains(&bus)
            });
            let (&child, link) = next?;
            if link.bridge.secondary_bus() == bus {
                return Some(child);
            }
            current = child;
        }
        None
    }

    fn lookup(
        state: &State,
        bus: u8,
        device: u8,
        function: u8,
    ) -> Option<(PciAddress, Arc<dyn PciDevice>)> {
        let logical = Self::route(state, bus)?;
        let addr = PciAddress::new(logical, device, function).ok()?;
        state
            .functions
            .get(&addr)
            .map(|f| (addr, Arc::clone(&f.dev)))
    }

    /// A configuration read of `bus:device.function` register `reg` (0..4096) as the guest
    /// addresses it. Missing functions read all ones.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, reg: u16, data: &mut [u8]) {
        let state = self.lock();
        match Self::lookup(&state, bus, device, function) {
            Some((_, dev)) if valid_config_access(reg, data.len()) => dev.config_read(reg, data),
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; updates the bus mappings when decoding changed.
    pub fn config_write(&self, bus: u8, device: u8, function: u8, reg: u16, data: &[u8]) {
        if !valid_config_access(reg, data.len()) {
            return;
        }
        let mut state = self.lock();
        let Some((addr, dev)) = Self::lookup(&state, bus, device, function) else {
            return;
        };
        let changes = dev.config_write(reg, data);
        let is_bridge = state.bridges.values().any(|l| l.at == addr);
        if !changes.is_empty() || is_bridge {
            self.resync(&mut state);
        }
    }

    /// Whether every bridge between bus 0 and `addr` forwards `region`.
    fn reachable(state: &State, addr: PciAddress, region: &PciBarRegion) -> bool {
        let mut bus = addr.bus;
        for _ in 0..256 {
            if bus == 0 {
                return true;
            }
            let Some(link) = state.bridges.get(&bus) else {
                return false;
            };
            if !link.bridge.forwards(region) {
                return false;
            }
            bus = link.at.bus;
        }
        false
    }

    /// Brings the buses in line with what every function decodes.
    fn resync(&self, state: &mut State) {
        let mut desired: BTreeMap<(PciAddress, u8), PciBarRegion> = BTreeMap::new();
        for (addr, f) in &state.functions {
            for r in f.dev.bars() {
                if r.size == 0 || !Self::reachable(state, *addr, &r) {
                    continue;
                }
                desired.insert((*addr, r.index), r);
            }
        }
        let stale: Vec<((PciAddress, u8), PciBarRegion)> = state
            .mapped
            .iter()
            .filter(|(k, r)| desired.get(k) != Some(r))
            .map(|(k, r)| (*k, *r))
            .collect();
        let mut old: BTreeMap<(PciAddress, u8), PciBarRegion> = BTreeMap::new();
        for (key, r) in stale {
            let bus = self.bus_for(r.kind);
            if let Err(e) = bus.remove(r.addr) {
                log::warn!(
                    "PCI {} BAR {}: cannot unmap {:#x}: {e}",
                    key.0,
                    key.1,
                    r.addr
                );
            }
            state.mapped.remove(&key);
            old.insert(key, r);
        }
        let mut touched: Vec<(PciAddress, u8)> = old.keys().copied().collect();
        for (key, r) in &desired {
            if state.mapped.contains_key(key) {
                continue;
            }
            let Some(f) = state.functions.get(&key.0) else {
                continue;
            };
            let handler = Arc::new(BarHandler {
                dev: Arc::clone(&f.dev),
                bar: key.1,
            });
            let result = BusRange::new(r.addr, r.size)
                .and_then(|range| self.bus_for(r.kind).insert(range, handler));
            match result {
                Ok(()) => {
                    state.mapped.insert(*key, *r);
                    touched.push(*key);
                }
                Err(e) => log::warn!(
                    "PCI {} BAR {} at {:#x}+{:#x} left unmapped: {e}",
                    key.0,
                    key.1,
                    r.addr,
                    r.size
                ),
            }
        }
        touched.sort();
        touched.dedup();
        let changes: Vec<_> = touched
            .into_iter()
            .map(|key| (key, old.get(&key).copied(), state.mapped.get(&key).copied()))
            .filter(|(_, before, after)| before != after)
            .collect();
        // Functions hear about every address they leave before any function hears about an
        // address it takes: a BAR may take over an address another BAR just left in the same
        // resync, and what the functions registered there (ioeventfds) must be released
        // before it is claimed again. A removed function is told by remove_device.
        for (key, before, _) in &changes {
            if let (Some(f), Some(before)) = (state.functions.get(&key.0), before) {
                f.dev.bar_moved(&BarChange {
                    old: Some(*before),
                    new: None,
                });
            }
        }
        for (key, _, after) in &changes {
            if let (Some(f), Some(after)) = (state.functions.get(&key.0), after) {
                f.dev.bar_moved(&BarChange {
                    old: None,
                    new: Some(*after),
                });
            }
        }
    }

    fn bus_for(&self, kind: PciBarKind) -> &Bus {
        match kind {
            PciBarKind::Io => &self.pio,
            _ => &self.mmio,
        }
    }
}

fn valid_config_access(reg: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && usize::from(reg) + len <= 4096 && usize::from(reg % 4) + len <= 4
}

/// The legacy configuration mechanism #1 at ports `0xCF8..0xD00`: `CONFIG_ADDRESS` (a
/// 32-bit register at 0xCF8: enable bit 31, bus 23:16, device 15:11, function 10:8,
/// register 7:2, and the AMD extended register bits 27:24) and `CONFIG_DATA` at
/// 0xCFC..0xD00.
///
/// Only 32-bit accesses reach `CONFIG_ADDRESS`; other accesses to 0xCF8..0xCFC are ignored
/// (reads: all ones). Data accesses with the enable bit clear read all ones.
pub struct PciConfigIo {
    root: Weak<PciRoot>,
    address: AtomicU32,
}

impl std::fmt::Debug for PciConfigIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfigIo")
            .field("address", &format_args!("{:#x}", self.address()))
            .finish_non_exhaustive()
    }
}

impl PciConfigIo {
    /// The access device for `root` (register it at [`PCI_CONFIG_IO_BASE`], 8 ports).
    ///
    /// It holds a weak reference (the root owns the buses it is registered on): once the
    /// root is dropped, data accesses read all ones.
    pub fn new(root: &Arc<PciRoot>) -> Self {
        Self {
            root: Arc::downgrade(root),
            address: AtomicU32::new(0),
        }
    }

    /// The `CONFIG_ADDRESS` latch (part of the machine state to save).
    pub fn address(&self) -> u32 {
        self.address.load(Ordering::SeqCst)
    }

    /// Restores the `CONFIG_ADDRESS` latch.
    pub fn set_address(&self, value: u32) {
        self.address.store(value & 0x8fff_fffc, Ordering::SeqCst);
    }

    fn target(&self, offset: u64, len: usize) -> Option<(u8, u8, u8, u16)> {
        let a = self.address();
        let byte = offset.checked_sub(4)? as u16;
        if a & 0x8000_0000 == 0 || usize::from(byte) + len > 4 {
            return None;
        }
        let bus = (a >> 16) as u8;
        let device = ((a >> 11) & 0x1f) as u8;
        let function = ((a >> 8) & 7) as u8;
        let reg = ((((a >> 24) & 0xf) << 8) | (a & 0xfc)) as u16 + byte;
        Some((bus, device, function, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.address().to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        match (self.target(offset, data.len()), self.root.upgrade()) {
            (Some((b, d, f, reg)), Some(root)) => root.config_read(b, d, f, reg, data),
            _ => data.fill(0xff),
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.set_address(u32::from_le_bytes(b));
            } else {
                log::debug!("PCI CF8: ignored {}-byte write at +{offset}", data.len());
            }
            return;
        }
        if let (Some((b, d, f, reg)), Some(root)) =
            (self.target(offset, data.len()), self.root.upgrade())
        {
            root.config_write(b, d, f, reg, data);
        }
    }
}

/// The ECAM window (PCI Express enhanced configuration access): function
/// `bus:device.function` register `reg` at offset `bus << 20 | device << 15 | function << 12
/// | reg`. Register it at [`ECAM_BASE`] with [`ECAM_SIZE`] bytes.
pub struct PciEcam {
    root: Weak<PciRoot>,
}

impl std::fmt::Debug for PciEcam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciEcam").finish_non_exhaustive()
    }
}

impl PciEcam {
    /// The ECAM device for `root` (a weak reference, as for [`PciConfigIo::new`]).
    pub fn new(root: &Arc<PciRoot>) -> Self {
        Self {
            root: Arc::downgrade(root),
        }
    }

    fn decode(offset: u64) -> Option<(u8, u8, u8, u16)> {
        if offset >= ECAM_SIZE {
            return None;
        }
        Some((
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
            (offset & 0xfff) as u16,
        ))
    }
}

impl BusDevice for PciEcam {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        match (Self::decode(offset), self.root.upgrade()) {
            (Some((b, d, f, reg)), Some(root)) => root.config_read(b, d, f, reg, data),
            _ => data.fill(0xff),
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some((b, d, f, reg)), Some(root)) = (Self::decode(offset), self.root.upgrade()) {
            root.config_write(b, d, f, reg, data);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testing::{TestDevice, TEST_MSIX_TABLE};
    use vmkit_device::testing::RecordingMsi;

    struct Machine {
        mmio: Arc<Bus>,
        pio: Arc<Bus>,
        root: Arc<PciRoot>,
    }

    fn machine() -> Machine {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let root = PciRoot::new(SlotPlan::default(), mmio.clone(), pio.clone());
        root.register_config_access().unwrap();
        Machine { mmio, pio, root }
    }

    fn dev() -> (Arc<RecordingMsi>, Arc<TestDevice>) {
        let g = Arc::new(RecordingMsi::new(4));
        (g.clone(), Arc::new(TestDevice::new(g).unwrap()))
    }

    impl Machine {
        fn ecam_r32(&self, a: PciAddress, reg: u64) -> u32 {
            let mut b = [0u8; 4];
            self.mmio
                .read(ECAM_BASE + a.ecam_offset() + reg, &mut b)
                .unwrap();
            u32::from_le_bytes(b)
        }

        fn ecam_w32(&self, a: PciAddress, reg: u64, v: u32) {
            self.mmio
                .write(ECAM_BASE + a.ecam_offset() + reg, &v.to_le_bytes())
                .unwrap();
        }

        fn cf8_read(&self, a: PciAddress, reg: u32, len: usize) -> Vec<u8> {
            let addr =
                0x8000_0000 | (u32::from(a.bus) << 16) | (u32::from(a.devfn()) << 8) | (reg & 0xfc);
            self.pio.write(0xcf8, &addr.to_le_bytes()).unwrap();
            let mut d = vec![0u8; len];
            self.pio.read(0xcfc + u64::from(reg & 3), &mut d).unwrap();
            d
        }
    }

    fn at(bus: u8, device: u8) -> PciAddress {
        PciAddress::new(bus, device, 0).unwrap()
    }

    #[test]
    fn host_bridge_and_missing_functions() {
        let m = machine();
        assert_eq!(m.cf8_read(at(0, 0), 0, 4), 0x0008_1b36u32.to_le_bytes());
        assert_eq!(m.cf8_read(at(0, 0), 0xa, 2), 0x0600u16.to_le_bytes());
        assert_eq!(m.cf8_read(at(0, 0), 0xb, 1), [0x06]);
        assert_eq!(m.cf8_read(at(0, 3), 0, 4), [0xff; 4]);
        assert_eq!(m.cf8_read(at(7, 0), 0, 4), [0xff; 4]);
        assert_eq!(m.ecam_r32(at(0, 0), 0), 0x0008_1b36);
        assert_eq!(m.ecam_r32(at(0, 9), 0), 0xffff_ffff);
        // CONFIG_ADDRESS reads back; non-dword accesses to it are ignored.
        m.pio.write(0xcf8, &0x8000_0804u32.to_le_bytes()).unwrap();
        m.pio.write(0xcf9, &[0x06]).unwrap();
        let mut b = [0u8; 4];
        m.pio.read(0xcf8, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x8000_0804);
        let mut b = [0u8; 2];
        m.pio.read(0xcfa, &mut b).unwrap();
        assert_eq!(b, [0xff; 2]);
        // Enable bit clear: data reads all ones.
        m.pio.write(0xcf8, &0u32.to_le_bytes()).unwrap();
        let mut b = [0u8; 4];
        m.pio.read(0xcfc, &mut b).unwrap();
        assert_eq!(b, [0xff; 4]);
        // AMD extended register bits 27:24 reach the extended space; the latch restores.
        m.pio.write(0xcf8, &0x8100_0000u32.to_le_bytes()).unwrap();
        let mut b = [0u8; 4];
        m.pio.read(0xcfc, &mut b).unwrap();
        assert_eq!(b, [0; 4], "register 0x100 of the host bridge");
        let io = PciConfigIo::new(&m.root);
        io.set_address(0xffff_ffff);
        assert_eq!(io.address(), 0x8fff_fffc);
        // A data access running past the dword (2 bytes at 0xCFF) is refused.
        m.pio.write(0xcf8, &0x8000_0000u32.to_le_bytes()).unwrap();
        assert!(
            m.pio.read(0xcff, &mut [0u8; 2]).is_err(),
            "crosses the range end"
        );
        let mut one = [0u8; 1];
        m.pio.read(0xcff, &mut one).unwrap();
        assert_eq!(one, [0x00]);
        // ECAM accesses of a bad size read all ones.
        let mut q = [0u8; 8];
        m.mmio.read(ECAM_BASE, &mut q).unwrap();
        assert_eq!(q, [0xff; 8]);
        assert!(
            m.root.register_config_access().is_err(),
            "already registered"
        );
    }

    #[test]
    fn add_device_assigns_slot_area_and_maps() {
        let m = machine();
        let (g, d) = dev();
        let addr = m.root.add_role(SlotRole::Disk(0), d.clone()).unwrap();
        assert_eq!(addr, at(0, 3));
        let mapped = m.root.mapped_bars(addr);
        let base = PCI_MMIO_BASE_SLOT3;
        assert_eq!(
            mapped,
            vec![
                PciBarRegion {
                    index: 0,
                    kind: PciBarKind::Memory64,
                    addr: base,
                    size: 0x4000
                },
                PciBarRegion {
                    index: 2,
                    kind: PciBarKind::Io,
                    addr: 0xc000 + 3 * 0x200,
                    size: 0x20
                },
            ]
        );
        assert_eq!(d.moves().len(), 2);
        assert_eq!(m.ecam_r32(addr, 0x10), 0xc300_0004);
        assert_eq!(m.ecam_r32(addr, 4) & 3, 3, "decoding enabled like firmware");
        // BAR accesses reach the device.
        m.mmio.write(base + 8, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        m.mmio.read(base + 8, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        m.pio.write(0xc600 + 4, &[9]).unwrap();
        let mut b = [0u8; 1];
        m.pio.read(0xc604, &mut b).unwrap();
        assert_eq!(b, [9]);
        // MSI-X: enable through ECAM, program vector 2 through the BAR, trigger.
        let cap = u64::from(m.ecam_r32(addr, 0x34) & 0xff);
        assert_eq!(m.ecam_r32(addr, cap) & 0xff, 0x11);
        m.ecam_w32(addr, cap, 0x8000_0000);
        let t = base + u64::from(TEST_MSIX_TABLE) + 2 * 16;
        m.mmio.write(t, &0xfee0_0000u64.to_le_bytes()).unwrap();
        m.mmio
            .write(t + 8, &0x0000_0000_0000_0061u64.to_le_bytes())
            .unwrap();
        d.msix().trigger(2).unwrap();
        assert_eq!(g.delivered(2), 1);
        assert_eq!(g.message(2).unwrap().data, 0x61);
        // Occupied address, missing bus.
        assert!(matches!(
            m.root.add_device(addr, dev().1),
            Err(PciError::AddressInUse(_))
        ));
        assert!(matches!(
            m.root.add_device(at(4, 0), dev().1),
            Err(PciError::NoSuchBus(4))
        ));
        assert!(m.root.add_role(SlotRole::HostBridge, dev().1).is_err());
    }

    const PCI_MMIO_BASE_SLOT3: u64 = 0xc300_0000;

    #[test]
    fn addresses_do_not_depend_on_other_devices() {
        let a = machine();
        let (_, d) = dev();
        a.root.add_role(SlotRole::Net(0), d).unwrap();
        let b = machine();
        b.root.add_role(SlotRole::Console, dev().1).unwrap();
        b.root.add_role(SlotRole::Disk(2), dev().1).unwrap();
        let (_, d2) = dev();
        b.root.add_role(SlotRole::Net(0), d2).unwrap();
        let n = SlotPlan::default().address(SlotRole::Net(0)).unwrap();
        assert_eq!(a.root.mapped_bars(n), b.root.mapped_bars(n));
    }

    #[test]
    fn guest_relocates_bar() {
        let m = machine();
        let (_, d) = dev();
        let addr = m.root.add_role(SlotRole::Rng, d.clone()).unwrap();
        let old = m.root.mapped_bars(addr)[0];
        // Linux-style sizing with decoding off.
        m.ecam_w32(addr, 4, 0);
        assert!(m.root.mapped_bars(addr).is_empty());
        assert!(m.mmio.resolve(old.addr).is_none());
        m.ecam_w32(addr, 0x10, 0xffff_ffff);
        assert_eq!(m.ecam_r32(addr, 0x10), 0xffff_c004);
        m.ecam_w32(addr, 0x10, 0xd000_0000);
        m.ecam_w32(addr, 4, 2);
        let now = m.root.mapped_bars(addr);
        assert_eq!(now.len(), 1, "only memory decoding on");
        assert_eq!(now[0].addr, 0xd000_0000);
        assert!(m.mmio.resolve(0xd000_0000).is_some());
        // Moving while decoding: old range gone, new range mapped, device told.
        m.ecam_w32(addr, 0x10, 0xd100_0000);
        assert!(m.mmio.resolve(0xd000_0000).is_none());
        assert!(m.mmio.resolve(0xd100_3fff).is_some());
        // A move is told as leaving the old address, then taking the new one.
        let moves = d.moves();
        let [.., left, took] = moves.as_slice() else {
            panic!("two moves expected: {moves:?}");
        };
        assert_eq!(
            (left.old.map(|r| r.addr), left.new),
            (Some(0xd000_0000), None)
        );
        assert_eq!(
            (took.old, took.new.map(|r| r.addr)),
            (None, Some(0xd100_0000))
        );
        // Upper half of the 64-bit BAR.
        m.ecam_w32(addr, 0x14, 0x2);
        assert!(m.mmio.resolve(0x2_d100_0000).is_some());
    }

    #[test]
    fn overlapping_bars_are_left_unmapped_until_they_fit() {
        let m = machine();
        let (_, a) = dev();
        let (_, b) = dev();
        let aa = m.root.add_role(SlotRole::Slot(20), a.clone()).unwrap();
        let ba = m.root.add_role(SlotRole::Slot(21), b.clone()).unwrap();
        let a_bar = m.root.mapped_bars(aa)[0];
        // Move b's BAR 0 onto a's.
        m.ecam_w32(ba, 0x10, a_bar.addr as u32);
        let b_bars = m.root.mapped_bars(ba);
        assert!(b_bars.iter().all(|r| r.index != 0), "b's BAR 0 unmapped");
        assert_eq!(m.root.mapped_bars(aa)[0], a_bar, "a untouched");
        assert_eq!(b.moves().last().unwrap().new, None);
        // Move a away: b now fits and gets mapped.
        m.ecam_w32(aa, 0x10, 0xd800_0000);
        assert_eq!(m.root.mapped_bars(ba)[0].addr, a_bar.addr);
        // Onto a platform device: refused, no panic.
        m.mmio
            .insert(
                BusRange::new(0xd900_0000, 0x1000).unwrap(),
                Arc::new(vmkit_device::testing::RecordingDevice::default()),
            )
            .unwrap();
        m.ecam_w32(aa, 0x10, 0xd900_0000);
        assert!(m.root.mapped_bars(aa).iter().all(|r| r.index != 0));
        // Onto the ECAM window.
        m.ecam_w32(aa, 0x10, ECAM_BASE as u32);
        assert!(m.root.mapped_bars(aa).iter().all(|r| r.index != 0));
        assert_eq!(m.ecam_r32(at(0, 0), 0), 0x0008_1b36, "ECAM still works");
    }

    #[test]
    fn bridges_forward_config_and_memory() {
        let m = machine();
        let br = m.root.add_bridge(at(0, 5), 1).unwrap();
        let (_, d) = dev();
        assert!(
            m.root.add_device(at(1, 0), d.clone()).is_err(),
            "no I/O BARs behind a bridge"
        );
        let (_, d) = {
            let g = Arc::new(RecordingMsi::new(4));
            (g.clone(), Arc::new(MemOnly::new(g)))
        };
        let mapped = m.root.add_device(at(1, 0), d.clone()).unwrap();
        assert_eq!(mapped[0].addr, 0xc500_0000);
        assert_eq!(m.ecam_r32(at(0, 5), 0x18), 0x0001_0100);
        assert_eq!(m.ecam_r32(at(0, 5), 0x0c) >> 16 & 0x7f, 1);
        assert_eq!(m.ecam_r32(at(1, 0), 0), 0x5678_1234);
        assert_eq!(m.cf8_read(at(1, 0), 0, 4), 0x5678_1234u32.to_le_bytes());
        // Nested bridge below, bus 2 as added.
        let inner = m.root.add_bridge(at(1, 1), 2).unwrap();
        assert_eq!(br.subordinate_bus(), 2, "subordinate raised");
        assert_eq!(inner.primary_bus(), 1);
        assert_eq!(m.ecam_r32(at(2, 0), 0), 0xffff_ffff);
        m.root
            .add_device(
                at(2, 0),
                Arc::new(MemOnly::new(Arc::new(RecordingMsi::new(1)))),
            )
            .unwrap();
        assert_eq!(m.ecam_r32(at(2, 0), 0), 0x5678_1234);
        assert_eq!(m.root.mapped_bars(at(2, 0))[0].addr, 0xc500_1000);
        // Guest renumbers: bridge 00:05.0 -> buses 3..=4, the inner one -> 4.
        m.ecam_w32(at(0, 5), 0x18, 0x0004_0300);
        m.ecam_w32(at(3, 1), 0x18, 0x0004_0403);
        assert_eq!(m.ecam_r32(at(1, 0), 0), 0xffff_ffff);
        assert_eq!(m.ecam_r32(at(3, 0), 0), 0x5678_1234);
        assert_eq!(m.ecam_r32(at(4, 0), 0), 0x5678_1234);
        assert_eq!(m.ecam_r32(at(2, 0), 0), 0xffff_ffff);
        assert_eq!(m.root.mapped_bars(at(2, 0))[0].addr, 0xc500_1000);
        // Memory forwarding off at the bridge: the device's BAR disappears.
        m.ecam_w32(at(0, 5), 4, 0);
        assert!(m.root.mapped_bars(at(1, 0)).is_empty());
        m.ecam_w32(at(0, 5), 4, 2);
        assert_eq!(m.root.mapped_bars(at(1, 0))[0].addr, 0xc500_0000);
        // Shrink the window below the BAR.
        m.ecam_w32(at(0, 5), 0x20, 0xc4f0_c400);
        assert!(m.root.mapped_bars(at(1, 0)).is_empty());
        assert!(m.root.add_bridge(at(0, 6), 2).is_err(), "bus 2 taken");
        assert!(m.root.remove_device(at(0, 5)).is_err());
    }

    #[test]
    fn remove_and_re_add_gets_the_same_bars() {
        let m = machine();
        let (_, d) = dev();
        let addr = m.root.add_role(SlotRole::Console, d.clone()).unwrap();
        let before = m.root.mapped_bars(addr);
        let removed = m.root.remove_device(addr).unwrap();
        assert!(m.root.device(addr).is_none());
        assert!(m.mmio.resolve(before[0].addr).is_none());
        assert_eq!(d.moves().last().unwrap().new, None);
        drop(removed);
        m.root.add_device(addr, dev().1).unwrap();
        assert_eq!(m.root.mapped_bars(addr), before);
        assert!(m.root.remove_device(at(0, 0)).is_err());
        assert_eq!(m.root.devices().len(), 2);
    }

    #[test]
    fn restored_device_keeps_guest_programmed_bars() {
        let m = machine();
        let (_, d) = dev();
        let addr = m.root.add_role(SlotRole::Disk(3), d.clone()).unwrap();
        m.ecam_w32(addr, 0x10, 0xd200_0000);
        let saved = d.save();
        let bytes = vmkit_migration::encode(&saved).unwrap();

        let m2 = machine();
        let (_, d2) = dev();
        d2.restore(&vmkit_migration::decode(&bytes).unwrap())
            .unwrap();
        m2.root.attach_device(addr, d2.clone()).unwrap();
        assert_eq!(m2.root.mapped_bars(addr), m.root.mapped_bars(addr));
        assert_eq!(m2.root.mapped_bars(addr)[0].addr, 0xd200_0000);

        // A restored function keeps its slot-area BARs reserved: another function of the
        // same slot added later gets other addresses.
        let m3 = machine();
        let (_, d3) = dev();
        m3.root.add_role(SlotRole::Disk(3), d3.clone()).unwrap();
        let saved = d3.save();
        let m4 = machine();
        let (_, d4) = dev();
        d4.restore(&saved).unwrap();
        m4.root.attach_device(addr, d4).unwrap();
        let f1 = PciAddress::new(0, addr.device, 1).unwrap();
        let got = m4.root.add_device(f1, dev().1).unwrap();
        assert_eq!(got.len(), 2, "both BARs of function 1 mapped");
        assert_ne!(got[0].addr, m4.root.mapped_bars(addr)[0].addr);
    }

    #[test]
    fn remap_retries_after_a_platform_device_leaves() {
        let m = machine();
        let (_, d) = dev();
        let addr = m.root.add_role(SlotRole::Slot(16), d).unwrap();
        m.mmio
            .insert(
                BusRange::new(0xd900_0000, 0x1000).unwrap(),
                Arc::new(vmkit_device::testing::RecordingDevice::default()),
            )
            .unwrap();
        m.ecam_w32(addr, 0x10, 0xd900_0000);
        assert!(m.root.mapped_bars(addr).iter().all(|r| r.index != 0));
        m.mmio.remove(0xd900_0000).unwrap();
        m.root.remap();
        assert_eq!(m.root.mapped_bars(addr)[0].addr, 0xd900_0000);
    }

    /// A device with only a memory BAR (for behind bridges).
    struct MemOnly(TestDeviceNoIo);
    type TestDeviceNoIo = Mutex<crate::PciConfigSpace>;

    impl MemOnly {
        fn new(g: Arc<RecordingMsi>) -> Self {
            let mut c = crate::PciConfigSpace::new(crate::PciHeader {
                vendor_id: 0x1234,
                device_id: 0x5678,
                revision: 0,
                class_code: 0xff,
                subclass: 0,
                prog_if: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            });
            c.add_bar(0, PciBarKind::Memory32, 0x1000, false).unwrap();
            c.add_msix(
                crate::MsixConfig {
                    vectors: 1,
                    table_bar: 0,
                    table_offset: 0,
                    pba_bar: 0,
                    pba_offset: 0x800,
                },
                g,
            )
            .unwrap();
            Self(Mutex::new(c))
        }
    }

    impl PciDevice for MemOnly {
        fn config_read(&self, offset: u16, data: &mut [u8]) {
            self.0.lock().unwrap().read(offset, data);
        }
        fn config_write(&self, offset: u16, data: &[u8]) -> Vec<BarChange> {
            self.0.lock().unwrap().write(offset, data)
        }
        fn bar_read(&self, _bar: u8, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn bar_write(&self, _bar: u8, _offset: u64, _data: &[u8]) {}
        fn bars(&self) -> Vec<PciBarRegion> {
            self.0.lock().unwrap().bars()
        }
        fn bar_info(&self) -> Vec<crate::PciBarInfo> {
            self.0.lock().unwrap().bar_info()
        }
        fn set_bar_address(&self, index: u8, addr: u64) -> Result<(), PciError> {
            self.0.lock().unwrap().set_bar_address(index, addr)
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_config_traffic_keeps_buses_consistent(
            ops in proptest::collection::vec(
                (0u8..3, 0u16..0x140, proptest::num::u32::ANY, 0usize..4), 0..200)
        ) {
            let m = machine();
            let a = m.root.add_role(SlotRole::Disk(0), dev().1).unwrap();
            let b = m.root.add_role(SlotRole::Disk(1), dev().1).unwrap();
            let br = at(0, 5);
            m.root.add_bridge(br, 1).unwrap();
            let targets = [a, b, br];
            for (t, reg, val, size) in ops {
                let len = [1usize, 2, 4, 3][size];
                let target = targets[usize::from(t)];
                let off = ECAM_BASE + target.ecam_offset() + u64::from(reg);
                let _ = m.mmio.write(off, &val.to_le_bytes()[..len]);
            }
            // What the root believes is mapped is exactly what the bus has.
            let mut expect: Vec<u64> = [a, b]
                .iter()
                .flat_map(|x| m.root.mapped_bars(*x))
                .filter(|r| r.kind != PciBarKind::Io)
                .map(|r| r.addr)
                .collect();
            expect.push(ECAM_BASE);
            expect.sort();
            let got: Vec<u64> = m.mmio.ranges().iter().map(|r| r.base()).collect();
            proptest::prop_assert_eq!(got, expect);
        }
    }
}
