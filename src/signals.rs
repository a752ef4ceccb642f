//! Ctrl-C handling for training: the first SIGINT or SIGTERM asks the run to stop after the
//! current update (the trainer then writes a final checkpoint and exits cleanly); a second one
//! exits at once with status 130. Nothing is installed unless a command asks for it.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
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
