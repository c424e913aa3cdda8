// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Worker threads: one thread per queue group, blocked in `epoll_wait` on the group's queue
//! notification eventfds, a stop eventfd, an optional wake eventfd and any backend file
//! descriptors the handler registers.
//!
//! The device logic lives in an [`EventHandler`]; this module is only wiring. Stopping a
//! worker returns its handler (with the queues inside), so a device can pause (stop the
//! threads, keep the queues) and resume (start new threads with the same handlers).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Token of the stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;
/// Backend tokens are offset by this so they never collide with queue slots.
const BACKEND_TOKEN_BASE: u64 = 1 << 32;

/// Registration of backend file descriptors, handed to [`EventHandler`] callbacks.
pub struct EventControl<'a> {
    epoll: &'a Epoll,
    stopping: &'a AtomicBool,
}

impl EventControl<'_> {
    /// Whether the worker has been asked to stop (reset, pause, drop): a handler that is
    /// draining a busy queue should return so that the stop does not wait on the guest.
    pub fn stop_requested(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Starts watching `fd` for `events` (level triggered); `token` comes back in
    /// [`EventHandler::backend_event`].
    pub fn add(&self, fd: RawFd, token: u32, events: EventSet) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, BACKEND_TOKEN_BASE + u64::from(token)),
        )
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// The device side of a worker: what to do when a queue is notified or a backend fd is
/// ready. Every callback runs on the worker thread.
pub trait EventHandler: Send + 'static {
    /// Called once when the thread starts (and again after each resume): register backend
    /// fds here and process anything already pending.
    fn start(&mut self, ctl: &EventControl<'_>) {
        let _ = ctl;
    }

    /// The driver notified the queue in `slot` (its position in the notifier list given to
    /// [`Worker::spawn`]).
    fn queue_notified(&mut self, slot: usize, ctl: &EventControl<'_>);

    /// A backend fd registered with [`EventControl::add`] is ready.
    fn backend_event(&mut self, token: u32, events: EventSet, ctl: &EventControl<'_>) {
        let _ = (token, events, ctl);
    }

    /// Called before the thread exits (stop or pause): unregister nothing, just drop
    /// transient state if needed.
    fn stop(&mut self) {}
}

/// What a stopped worker hands back: its handler and its queue notifiers.
pub struct Parked<H> {
    /// The handler, with its queues.
    pub handler: H,
    /// The queue notification eventfds, in slot order.
    pub notifiers: Vec<EventFd>,
}

/// A running worker thread.
pub struct Worker<H: EventHandler> {
    stop: EventFd,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<Parked<H>>>,
}

impl<H: EventHandler> Worker<H> {
    /// Starts a thread named `name` serving `handler`, woken by `notifiers` (slot `i` is
    /// `notifiers[i]`).
    pub fn spawn(name: String, handler: H, notifiers: Vec<EventFd>) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (slot, fd) in notifiers.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, slot as u64),
            )?;
        }
        let stop_thread = stop.try_clone()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stopping_thread = stopping.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(epoll, stop_thread, &stopping_thread, handler, notifiers))?;
        Ok(Worker {
            stop,
            stopping,
            thread: Some(thread),
        })
    }

    /// Stops the thread after the request it is processing and returns the handler.
    /// Returns `None` if the thread panicked (logged).
    pub fn stop(mut self) -> Option<Parked<H>> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<Parked<H>> {
        let thread = self.thread.take()?;
        self.stopping.store(true, Ordering::Release);
        if let Err(e) = self.stop.write(1) {
            log::error!("virtio worker: cannot signal stop: {e}");
        }
        match thread.join() {
            Ok(parked) => Some(parked),
            Err(_) => {
                log::error!("virtio worker thread panicked");
                None
            }
        }
    }
}

impl<H: EventHandler> Drop for Worker<H> {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

fn run<H: EventHandler>(
    epoll: Epoll,
    stop: EventFd,
    stopping: &AtomicBool,
    mut handler: H,
    notifiers: Vec<EventFd>,
) -> Parked<H> {
    let ctl = EventControl {
        epoll: &epoll,
        stopping,
    };
    handler.start(&ctl);
    let mut events = vec![EpollEvent::default(); notifiers.len() + 16];
    'outer: loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio worker: epoll_wait failed: {e}");
                break;
            }
        };
        for ev in events.iter().take(n) {
            let token = ev.data();
            if token == STOP_TOKEN {
                let _ = stop.read();
                break 'outer;
            }
            if token >= BACKEND_TOKEN_BASE {
                let t = u32::try_from(token - BACKEND_TOKEN_BASE).unwrap_or(u32::MAX);
                handler.backend_event(t, ev.event_set(), &ctl);
                continue;
            }
            let slot = token as usize;
            if let Some(fd) = notifiers.get(slot) {
                // Reset the counter before processing: a notification arriving while we
                // process will wake us again.
                let _ = fd.read();
                handler.queue_notified(slot, &ctl);
            }
        }
    }
    handler.stop();
    Parked { handler, notifiers }
}

/// The workers of one device: running threads, or parked handlers while paused.
pub struct WorkerSet<H: EventHandler> {
    name: String,
    running: Vec<Worker<H>>,
    parked: Vec<Parked<H>>,
}

impl<H: EventHandler> WorkerSet<H> {
    /// An empty set; `name` prefixes the thread names.
    pub fn new(name: &str) -> Self {
        WorkerSet {
            name: name.to_owned(),
            running: Vec::new(),
            parked: Vec::new(),
        }
    }

    /// Starts one thread per handler. On error, threads already started are stopped.
    pub fn start(&mut self, groups: Vec<Parked<H>>) -> io::Result<()> {
        for (i, p) in groups.into_iter().enumerate() {
            match Worker::spawn(format!("{}-{i}", self.name), p.handler, p.notifiers) {
                Ok(w) => self.running.push(w),
                Err(e) => {
                    self.clear();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Stops the threads, keeping their handlers for [`WorkerSet::resume`].
    pub fn pause(&mut self) {
        for w in self.running.drain(..) {
            if let Some(p) = w.stop() {
                self.parked.push(p);
            }
        }
    }

    /// Restarts paused handlers on new threads.
    pub fn resume(&mut self) -> io::Result<()> {
        let parked = std::mem::take(&mut self.parked);
        self.start(parked)
    }

    /// Stops the threads and hands back every handler (running or parked).
    pub fn take(&mut self) -> Vec<Parked<H>> {
        self.pause();
        std::mem::take(&mut self.parked)
    }

    /// Stops everything and drops the handlers (and with them the queues).
    pub fn clear(&mut self) {
        for w in self.running.drain(..) {
            drop(w.stop());
        }
        self.parked.clear();
    }

    /// Whether any thread is running or any handler is parked.
    pub fn is_active(&self) -> bool {
        !self.running.is_empty() || !self.parked.is_empty()
    }

    /// Whether the set is paused (handlers parked, no thread running).
    pub fn is_paused(&self) -> bool {
        self.running.is_empty() && !self.parked.is_empty()
    }

    /// The parked handlers (while paused), for inspection.
    pub fn parked(&self) -> impl Iterator<Item = &H> {
        self.parked.iter().map(|p| &p.handler)
    }
}

impl<H: EventHandler> Drop for WorkerSet<H> {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::mpsc;

    struct Echo {
        tx: mpsc::Sender<usize>,
        count: usize,
    }

    impl EventHandler for Echo {
        fn queue_notified(&mut self, slot: usize, _ctl: &EventControl<'_>) {
            self.count += 1;
            self.tx.send(slot).unwrap();
        }
    }

    #[test]
    fn notifications_reach_handler_and_stop_returns_it() {
        let (tx, rx) = mpsc::channel();
        let n0 = EventFd::new(EFD_NONBLOCK).unwrap();
        let n1 = EventFd::new(EFD_NONBLOCK).unwrap();
        let k1 = n1.try_clone().unwrap();
        let w = Worker::spawn("t".into(), Echo { tx, count: 0 }, vec![n0, n1]).unwrap();
        k1.write(1).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            1
        );
        let parked = w.stop().unwrap();
        assert_eq!(parked.handler.count, 1);
        assert_eq!(parked.notifiers.len(), 2);
    }

    #[test]
    fn pause_and_resume_keep_the_handler() {
        let (tx, rx) = mpsc::channel();
        let n0 = EventFd::new(EFD_NONBLOCK).unwrap();
        let k0 = n0.try_clone().unwrap();
        let mut set = WorkerSet::new("t");
        set.start(vec![Parked {
            handler: Echo { tx, count: 0 },
            notifiers: vec![n0],
        }])
        .unwrap();
        k0.write(1).unwrap();
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        set.pause();
        assert!(set.is_paused());
        assert_eq!(set.parked().next().unwrap().count, 1);
        // A notification while paused is served after resume.
        k0.write(1).unwrap();
        set.resume().unwrap();
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        set.clear();
        assert!(!set.is_active());
    }
}
