//! The I/O engines that run a queue's reads, writes and flushes, several in flight:
//!
//! - `io-uring`: one ring per queue, made before the seccomp allowlist is installed and
//!   locked down with `IORING_REGISTER_RESTRICTIONS` so that it can only read, write and
//!   fsync the image (registered as fixed file 0; every submission must use it). Once
//!   sandboxed the process needs only `io_uring_enter`, which the allowlist admits;
//!   `io_uring_setup` and `io_uring_register` stay denied.
//!   Each ring's kernel worker threads (io-wq, which take buffered writes) are capped at
//!   [`IOWQ_WORKERS`]: under `bulkheadd` the backend's threads count against a per-uid
//!   RLIMIT_NPROC. A request the kernel gives back undone (ECANCELED — seen once in the
//!   disk suite, cause not pinned down; EAGAIN, EINTR) is done by the queue thread itself.
//! - `threads`: one pool of [`POOL_THREADS`] threads per backend, shared by its queues,
//!   doing blocking `preadv`/`pwritev`/`fdatasync`; used when the kernel refuses io_uring
//!   (old kernel, `kernel.io_uring_disabled`).
//! - `inline`: each request done on the queue thread as it is taken (one in flight; the
//!   behaviour before engines existed, kept for comparison).
//!
//! An engine only moves bytes: requests are validated before, and their status written
//! after, by [`super::request`]. Completions come back in any order, named by the token
//! given at submission.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::disk::{Disk, Rw};
use super::request::{IoOp, IoRequest};

/// Which engine to use (`--io-engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring if the kernel allows it, the thread pool otherwise.
    #[default]
    Auto,
    /// io_uring, or fail.
    IoUring,
    /// The thread pool.
    Threads,
    /// One request at a time on the queue thread.
    Inline,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineKind::Auto),
            "io-uring" => Ok(EngineKind::IoUring),
            "threads" => Ok(EngineKind::Threads),
            "inline" => Ok(EngineKind::Inline),
            _ => Err(format!(
                "unknown I/O engine '{s}' (auto, io-uring, threads, inline)"
            )),
        }
    }
}

/// Why an engine could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// io_uring is refused by the kernel or could not be locked down.
    #[error("io_uring unavailable: {0}")]
    Uring(#[source] io::Error),
    /// A pool thread could not be started.
    #[error("cannot start an I/O thread: {0}")]
    Thread(#[source] io::Error),
    /// A queue's rate-limit timer could not be made.
    #[error("cannot make a queue timer: {0}")]
    Timer(#[source] io::Error),
}

/// Threads in the `threads` engine's pool (one pool per backend).
pub const POOL_THREADS: usize = 8;
/// Most io-wq kernel workers per queue thread, for file I/O ("bounded") and for the rest.
pub const IOWQ_WORKERS: [u32; 2] = [4, 1];

/// One queue's engine.
pub struct Engine {
    imp: Imp,
    in_flight: usize,
}

enum Imp {
    /// The ring, and the eventfd the kernel signals for every completion it posts.
    Uring(Box<io_uring::IoUring>, EventFd),
    Threads(PoolClient),
    Inline(Arc<Disk>, VecDeque<(u64, io::Result<usize>)>),
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.name())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Engine {
    /// An engine of `kind` for `disk`, able to hold `depth` requests in flight; `pool` is
    /// the backend's thread pool, started on first use by a `threads` engine and shared by
    /// the others. With [`EngineKind::Auto`], a refused io_uring falls back to the thread
    /// pool; the second value then says why.
    pub fn new(
        kind: EngineKind,
        disk: &Arc<Disk>,
        depth: u32,
        pool: &mut Option<Arc<Pool>>,
    ) -> Result<(Engine, Option<EngineError>), EngineError> {
        let make = |imp| Engine { imp, in_flight: 0 };
        let mut threads = || -> Result<Imp, EngineError> {
            let p = match pool {
                Some(p) => p.clone(),
                None => pool.insert(Arc::new(Pool::new(disk)?)).clone(),
            };
            Ok(Imp::Threads(PoolClient::new(p)))
        };
        match kind {
            EngineKind::Inline => Ok((make(Imp::Inline(disk.clone(), VecDeque::new())), None)),
            EngineKind::Threads => Ok((make(threads()?), None)),
            EngineKind::IoUring => {
                let (ring, done) = uring(disk, depth)?;
                Ok((make(Imp::Uring(Box::new(ring), done)), None))
            }
            EngineKind::Auto => match uring(disk, depth) {
                Ok((ring, done)) => Ok((make(Imp::Uring(Box::new(ring), done)), None)),
                Err(e) => Ok((make(threads()?), Some(e))),
            },
        }
    }

    /// The engine's name, as `--io-engine` spells it.
    pub fn name(&self) -> &'static str {
        match self.imp {
            Imp::Uring(..) => "io-uring",
            Imp::Threads(_) => "threads",
            Imp::Inline(..) => "inline",
        }
    }

    /// A descriptor that becomes readable when a completion is ready for [`Engine::wait`]
    /// (io_uring only: the other engines' waits block instead). Reset it with
    /// [`Engine::clear_completion_event`] before looking for completions.
    pub fn completion_fd(&self) -> Option<RawFd> {
        match &self.imp {
            Imp::Uring(_, done) => Some(done.as_raw_fd()),
            _ => None,
        }
    }

    /// True if [`Engine::wait`] would find a completion now (io_uring: a posted completion
    /// or completion work the kernel holds until we enter it). Cheap: no system call.
    pub fn completion_pending(&mut self) -> bool {
        match &mut self.imp {
            Imp::Uring(ring, _) => !ring.completion().is_empty() || ring.submission().taskrun(),
            _ => false,
        }
    }

    /// Resets the readiness of [`Engine::completion_fd`].
    pub fn clear_completion_event(&self) {
        if let Imp::Uring(_, done) = &self.imp {
            // Non-blocking: nothing to read is fine.
            let _ = done.read();
        }
    }

    /// Requests submitted and not yet returned by [`Engine::wait`].
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Starts `req`; its completion is returned by [`Engine::wait`] with `token`. The
    /// request's iovecs must stay valid until then (they live on the heap, so the request
    /// itself may move).
    pub fn submit(&mut self, token: u64, req: &IoRequest) -> io::Result<()> {
        match &mut self.imp {
            Imp::Inline(disk, done) => {
                let r = req.run_blocking(disk).map(|()| req.bytes as usize);
                done.push_back((token, r));
            }
            Imp::Threads(pool) => pool.submit(token, req)?,
            Imp::Uring(ring, _) => {
                use io_uring::{opcode, types};
                let fixed = types::Fixed(0);
                let iov = req.iovecs();
                let entry = match req.op {
                    IoOp::Data(Rw::Read) => {
                        opcode::Readv::new(fixed, iov.as_ptr(), iov.len() as u32)
                            .offset(req.offset)
                            .build()
                    }
                    IoOp::Data(Rw::Write) => {
                        opcode::Writev::new(fixed, iov.as_ptr(), iov.len() as u32)
                            .offset(req.offset)
                            .build()
                    }
                    IoOp::Flush => opcode::Fsync::new(fixed)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                }
                .flags(io_uring::squeue::Flags::FIXED_FILE)
                .user_data(token);
                loop {
                    // SAFETY: the iovecs (and the memory they describe) stay valid until
                    // the completion is reaped (the caller's contract above).
                    if unsafe { ring.submission().push(&entry) }.is_ok() {
                        break;
                    }
                    // The submission queue is full: hand it to the kernel first.
                    match ring.submit() {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                        Err(e) => return Err(e),
                    }
                }
                // Hand it to the kernel now rather than with the next batch: the disk
                // starts on it while the queue takes the next request from the guest.
                // Submitted with the next `wait` instead, the guest's requests reached
                // the host disk in cohorts (each held until the last one was taken), and
                // the disk served cohorts more slowly than a steady stream. If this enter
                // fails the entry stays queued: `wait` submits it again and reports.
                loop {
                    match ring.submit() {
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                        _ => break,
                    }
                }
            }
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Submits what is queued and waits until at least `min` requests (at most those in
    /// flight) have completed; appends every completion available to `out` as (token,
    /// bytes transferred or error). A short count means the rest is still to be done.
    pub fn wait(&mut self, min: usize, out: &mut Vec<(u64, io::Result<usize>)>) -> io::Result<()> {
        let min = min.min(self.in_flight);
        let before = out.len();
        match &mut self.imp {
            Imp::Inline(_, done) => out.extend(done.drain(..)),
            Imp::Threads(pool) => pool.wait(min, out),
            Imp::Uring(ring, _) => loop {
                match ring.submit_and_wait(min.saturating_sub(out.len() - before)) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                    Err(e) => return Err(e),
                }
                for cqe in ring.completion() {
                    let res = cqe.result();
                    let r = if res < 0 {
                        Err(io::Error::from_raw_os_error(-res))
                    } else {
                        Ok(res as usize)
                    };
                    out.push((cqe.user_data(), r));
                }
                if out.len() - before >= min {
                    break;
                }
            },
        }
        self.in_flight = self.in_flight.saturating_sub(out.len() - before);
        Ok(())
    }
}

/// A ring for `disk` that can only read, write and fsync it, and the eventfd it signals
/// for each completion (registered before the ring is locked down).
fn uring(disk: &Disk, depth: u32) -> Result<(io_uring::IoUring, EventFd), EngineError> {
    use io_uring::register::Restriction;
    use io_uring::{opcode, squeue};
    let ring = io_uring::IoUring::builder()
        .setup_r_disabled()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(depth.clamp(1, 4096).next_power_of_two())
        .map_err(EngineError::Uring)?;
    let sub = ring.submitter();
    sub.register_files(&[disk.file().as_raw_fd()])
        .map_err(EngineError::Uring)?;
    let done = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(EngineError::Uring)?;
    sub.register_eventfd(done.as_raw_fd())
        .map_err(EngineError::Uring)?;
    let mut max = IOWQ_WORKERS;
    sub.register_iowq_max_workers(&mut max)
        .map_err(EngineError::Uring)?;
    let mut only = [
        Restriction::sqe_op(opcode::Readv::CODE),
        Restriction::sqe_op(opcode::Writev::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
        Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
    ];
    sub.register_restrictions(&mut only)
        .map_err(EngineError::Uring)?;
    sub.register_enable_rings().map_err(EngineError::Uring)?;
    Ok((ring, done))
}

/// One request for a pool thread: what to do, where (raw iovecs), and whom to tell.
struct Job {
    token: u64,
    op: IoOp,
    offset: u64,
    iovecs: Vec<libc::iovec>,
    done: Arc<WaitQueue<(u64, io::Result<usize>)>>,
}

// SAFETY: the iovecs point into guest memory or a request's bounce buffer, both kept alive
// by the queue thread until the job's completion has been received; only the pool thread
// that took the job touches that memory meanwhile.
unsafe impl Send for Job {}

/// A FIFO whose takers sleep on a condition variable until an item comes or it is closed.
/// (Not a crossbeam channel: its blocking receive spins and then calls `sched_yield`, and
/// on this 2-CPU host beside a spinning vCPU one yield hands the CPU away for a whole
/// time slice, 3 ms: the pool ran at 240 requests/s at queue depth 1.)
struct WaitQueue<T> {
    state: std::sync::Mutex<(VecDeque<T>, bool)>,
    ready: std::sync::Condvar,
}

impl<T> WaitQueue<T> {
    fn new() -> WaitQueue<T> {
        WaitQueue {
            state: std::sync::Mutex::new((VecDeque::new(), false)),
            ready: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (VecDeque<T>, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `item`; false if the queue was closed.
    fn push(&self, item: T) -> bool {
        let mut st = self.lock();
        if st.1 {
            return false;
        }
        st.0.push_back(item);
        drop(st);
        self.ready.notify_one();
        true
    }

    /// The next item, sleeping until there is one; None once closed and empty.
    fn pop(&self) -> Option<T> {
        let mut st = self.lock();
        loop {
            if let Some(item) = st.0.pop_front() {
                return Some(item);
            }
            if st.1 {
                return None;
            }
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Moves every item there is into `out`.
    fn drain_into(&self, out: &mut Vec<T>) {
        out.extend(self.lock().0.drain(..));
    }

    /// Wakes every taker; what is queued is still taken, then `pop` returns None.
    fn close(&self) {
        self.lock().1 = true;
        self.ready.notify_all();
    }
}

/// The `threads` engine's pool: one per backend, shared by its queues.
pub struct Pool {
    jobs: Arc<WaitQueue<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Pool {
    fn new(disk: &Arc<Disk>) -> Result<Pool, EngineError> {
        let jobs = Arc::new(WaitQueue::<Job>::new());
        let mut threads = Vec::with_capacity(POOL_THREADS);
        for i in 0..POOL_THREADS {
            let (rx, disk) = (jobs.clone(), disk.clone());
            let t = std::thread::Builder::new()
                .name(format!("blk-io{i}"))
                .spawn(move || {
                    while let Some(job) = rx.pop() {
                        let r = match job.op {
                            IoOp::Flush => disk.flush().map(|()| 0),
                            IoOp::Data(rw) => {
                                let n = job.iovecs.iter().map(|v| v.iov_len).sum();
                                // SAFETY: see `Job`: the memory stays mapped until the
                                // completion is received.
                                unsafe { disk.transfer(rw, &job.iovecs, job.offset, 0) }.map(|()| n)
                            }
                        };
                        // A queue that went away no longer wants the answer.
                        let _ = job.done.push((job.token, r));
                    }
                })
                .map_err(EngineError::Thread)?;
            threads.push(t);
        }
        Ok(Pool { jobs, threads })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the job queue ends the threads once they finish what they hold.
        self.jobs.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One queue's use of the pool: its own completion queue.
struct PoolClient {
    pool: Arc<Pool>,
    done: Arc<WaitQueue<(u64, io::Result<usize>)>>,
}

impl PoolClient {
    fn new(pool: Arc<Pool>) -> PoolClient {
        PoolClient {
            pool,
            done: Arc::new(WaitQueue::new()),
        }
    }

    fn submit(&mut self, token: u64, req: &IoRequest) -> io::Result<()> {
        let job = Job {
            token,
            op: req.op,
            offset: req.offset,
            iovecs: req.iovecs().to_vec(),
            done: self.done.clone(),
        };
        if self.pool.jobs.push(job) {
            Ok(())
        } else {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    fn wait(&mut self, min: usize, out: &mut Vec<(u64, io::Result<usize>)>) {
        for _ in 0..min {
            match self.done.pop() {
                Some(c) => out.push(c),
                None => return,
            }
        }
        self.done.drain_into(out);
    }
}
