//! Ctrl-C handling for training: the first SIGINT or SIGTERM asks the run to stop after the
//! current update (the trainer then writes a final checkpoint, and the command exits with the
//! shell's status for that signal, 130 or 143, so scripts can tell it from a finished run); a
//! second one exits at once with that status. Nothing is installed unless a command asks for it.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
    if STOP.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// The exit status for a run stopped by a signal: 128 + its number (130 for SIGINT, 143 for
/// SIGTERM); `None` when no signal arrived.
pub fn exit_status() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(128 + sig),
    }
}

/// Installs the handlers (Unix); also makes writes past a file-size limit fail with EFBIG
/// instead of killing the process, so a full disk or quota becomes an ordinary error.
pub fn install() {
    #[cfg(unix)]
    // SAFETY: the handler only touches an atomic and calls _exit.
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// True once a stop was requested.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Ctrl-C for interactive commands (`chat`): while a reply is being generated it asks for that
/// reply to stop; otherwise it prints a hint and the program goes on.
pub mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};

    static GENERATING: AtomicBool = AtomicBool::new(false);
    static REQUESTED: AtomicBool = AtomicBool::new(false);
    const HINT: &[u8] = b"\n(Ctrl-C stops a reply; /quit or Ctrl-D leaves)\n> ";

    extern "C" fn on_sigint(_: libc::c_int) {
        if GENERATING.load(Ordering::SeqCst) {
            REQUESTED.store(true, Ordering::SeqCst);
        } else {
            // SAFETY: write(2) is async-signal-safe; HINT is a static buffer.
            unsafe { libc::write(2, HINT.as_ptr().cast(), HINT.len()) };
        }
    }

    /// Installs the SIGINT handler (Unix).
    pub fn install() {
        #[cfg(unix)]
        // SAFETY: the handler only touches atomics and calls write(2).
        unsafe {
            libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
    }

    /// Marks the start (true) or end (false) of a reply; starting clears a stale request.
    pub fn generating(on: bool) {
        REQUESTED.store(false, Ordering::SeqCst);
        GENERATING.store(on, Ordering::SeqCst);
    }

    /// True once Ctrl-C was pressed during the current reply.
    pub fn requested() -> bool {
        REQUESTED.load(Ordering::SeqCst)
    }
}
