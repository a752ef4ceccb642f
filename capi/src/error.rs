//! Status codes, the thread-local last-error message, and `guard`, the wrapper every entry
//! point runs its body in: it turns errors into a status code plus a message and catches
//! panics, so that none unwinds into C.

use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// What a call returned. Every function of the library that can fail returns one of these;
/// on anything but `ANETRAIN_STATUS_OK`, `anetrain_last_error()` says what went wrong in one
/// sentence, and the call wrote no results, except that a handle output is set to the zero
/// handle and a length output reports the length the call needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnetrainStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullPointer = 1,
    /// A buffer's length does not fit the call: too small for the result (the call then
    /// reports the length it needs where it has an out-length argument), or not the length
    /// the operation takes.
    BadLength = 2,
    /// A handle that is not a live object of the expected kind: freed, never issued, or a
    /// handle of another kind.
    BadHandle = 3,
    /// An argument's value is invalid (not UTF-8, a token id outside the vocabulary, an
    /// unknown preset, an inconsistent configuration).
    BadArgument = 4,
    /// A file could not be read or written (missing, unreadable, corrupt, disk full).
    Io = 5,
    /// The operation failed for another reason (e.g. a MIL program the simulator or the
    /// Neural Engine refuses, not enough memory).
    Failed = 6,
    /// The handle is in use by another call: another thread, or a generation callback
    /// calling back into the handle it is generating with.
    Busy = 7,
    /// An internal error (a bug in anetrain) was caught before it could reach the caller.
    /// The handles the call used may be unusable afterwards (their calls return
    /// `ANETRAIN_STATUS_FAILED`); free them.
    Internal = 8,
}

impl AnetrainStatus {
    pub(crate) fn name(self) -> &'static std::ffi::CStr {
        match self {
            AnetrainStatus::Ok => c"ANETRAIN_STATUS_OK",
            AnetrainStatus::NullPointer => c"ANETRAIN_STATUS_NULL_POINTER",
            AnetrainStatus::BadLength => c"ANETRAIN_STATUS_BAD_LENGTH",
            AnetrainStatus::BadHandle => c"ANETRAIN_STATUS_BAD_HANDLE",
            AnetrainStatus::BadArgument => c"ANETRAIN_STATUS_BAD_ARGUMENT",
            AnetrainStatus::Io => c"ANETRAIN_STATUS_IO",
            AnetrainStatus::Failed => c"ANETRAIN_STATUS_FAILED",
            AnetrainStatus::Busy => c"ANETRAIN_STATUS_BUSY",
            AnetrainStatus::Internal => c"ANETRAIN_STATUS_INTERNAL",
        }
    }
}

/// A failed call: its status and its one-sentence message.
#[derive(Debug)]
pub(crate) struct Fail {
    pub status: AnetrainStatus,
    pub msg: String,
}

pub(crate) type Res<T> = Result<T, Fail>;

pub(crate) fn fail(status: AnetrainStatus, msg: impl Into<String>) -> Fail {
    Fail { status, msg: msg.into() }
}

impl From<anyhow::Error> for Fail {
    /// Library errors are `FAILED`, or `IO` when an I/O error is among their causes.
    fn from(e: anyhow::Error) -> Self {
        let io = e.chain().any(|c| c.is::<std::io::Error>());
        fail(if io { AnetrainStatus::Io } else { AnetrainStatus::Failed }, format!("{e:#}"))
    }
}

/// An `anyhow` error as a `Fail` with `status`, keeping its message.
pub(crate) fn with_status(status: AnetrainStatus) -> impl FnOnce(anyhow::Error) -> Fail {
    move |e| fail(status, format!("{e:#}"))
}

thread_local! {
    /// The message of this thread's last failed call; empty after a successful one.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    // Interior NULs would cut the message short; C strings cannot hold them.
    let text = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// Runs an entry point's body: clears the last error, catches panics, and turns the outcome
/// into a status (recording the message of a failure).
pub(crate) fn guard(body: impl FnOnce() -> Res<()>) -> AnetrainStatus {
    set_last_error("");
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        Err(fail(AnetrainStatus::Internal, format!("internal error in anetrain (please report it): {what}")))
    });
    match outcome {
        Ok(()) => {
            // A callback may have made failing calls of its own during this one.
            set_last_error("");
            AnetrainStatus::Ok
        }
        Err(f) => {
            let msg = if f.msg.trim().is_empty() { "unspecified error".to_string() } else { f.msg };
            set_last_error(&msg);
            f.status
        }
    }
}

/// The message of the calling thread's most recent failed call, as a NUL-terminated UTF-8
/// string; empty ("") when the most recent call succeeded. Never NULL. The pointer stays
/// valid until this thread's next call into the library.
#[unsafe(no_mangle)]
pub extern "C" fn anetrain_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The name of a status code (e.g. "ANETRAIN_STATUS_BAD_HANDLE"), or "unknown status" for
/// a value that is not one. Never NULL; the string is static.
#[unsafe(no_mangle)]
pub extern "C" fn anetrain_status_name(status: i32) -> *const c_char {
    use AnetrainStatus::*;
    let all = [Ok, NullPointer, BadLength, BadHandle, BadArgument, Io, Failed, Busy, Internal];
    match all.into_iter().find(|s| *s as i32 == status) {
        Some(s) => s.name().as_ptr(),
        None => c"unknown status".as_ptr(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        // SAFETY: `anetrain_last_error` returns a valid NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(anetrain_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn panics_become_a_status_and_a_message() {
        let s = guard(|| panic!("deliberate"));
        assert_eq!(s, AnetrainStatus::Internal);
        assert!(last().contains("deliberate"), "{}", last());
        assert_eq!(guard(|| Ok(())), AnetrainStatus::Ok);
        assert_eq!(last(), "", "a successful call clears the last error");
        let s = guard(|| Err(fail(AnetrainStatus::BadLength, "with a \0 inside")));
        assert_eq!(s, AnetrainStatus::BadLength);
        assert_eq!(last(), "with a   inside");
    }
}
