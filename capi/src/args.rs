//! Checked views of the caller's pointers. Each check refuses what can be detected: NULL,
//! misalignment, lengths whose byte size overflows, text that is not UTF-8. What cannot be
//! detected (a pointer to too little memory for its stated length) is the caller's contract,
//! stated in the header.

use crate::error::{AnetrainStatus, Res, fail};
use std::ffi::{CStr, c_char};

fn check_ptr<T>(ptr: *const T, len: usize, what: &str) -> Res<()> {
    if ptr.is_null() {
        return Err(fail(AnetrainStatus::NullPointer, format!("{what} is NULL")));
    }
    if !ptr.is_aligned() {
        return Err(fail(
            AnetrainStatus::BadArgument,
            format!("{what} is not aligned to {} bytes", std::mem::align_of::<T>()),
        ));
    }
    if len.checked_mul(std::mem::size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return Err(fail(AnetrainStatus::BadLength, format!("{what}: a length of {len} elements is impossibly large")));
    }
    Ok(())
}

/// `len` elements at `ptr`; an empty slice when `len` is 0 (then `ptr` may be NULL).
///
/// # Safety
/// When non-NULL, `ptr` points to `len` readable, initialised elements that outlive `'a`.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize, what: &str) -> Res<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    check_ptr(ptr, len, what)?;
    // SAFETY: non-NULL, aligned, size in bounds; the caller promises `len` elements.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// `len` writable elements at `ptr`; an empty slice when `len` is 0.
///
/// # Safety
/// When non-NULL, `ptr` points to `len` writable elements, not aliased during `'a`.
pub(crate) unsafe fn slice_mut<'a, T>(ptr: *mut T, len: usize, what: &str) -> Res<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    check_ptr(ptr, len, what)?;
    // SAFETY: as `slice`, for writing.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// A NUL-terminated UTF-8 string.
///
/// # Safety
/// When non-NULL, `ptr` points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn text<'a>(ptr: *const c_char, what: &str) -> Res<&'a str> {
    if ptr.is_null() {
        return Err(fail(AnetrainStatus::NullPointer, format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str().map_err(|e| fail(AnetrainStatus::BadArgument, format!("{what} is not valid UTF-8 ({e})")))
}

/// Checks an output pointer before any work, so that a NULL one fails before the call does
/// anything (and changes nothing).
pub(crate) fn out_ptr<T>(ptr: *mut T, what: &str) -> Res<()> {
    check_ptr(ptr.cast_const(), 1, what)
}

/// Writes `value` through an output pointer checked with `out_ptr`.
///
/// # Safety
/// `ptr` passed `out_ptr` and points to writable memory for one `T`.
pub(crate) unsafe fn write<T>(ptr: *mut T, value: T) {
    // SAFETY: checked non-NULL and aligned by `out_ptr`; writable by the caller's contract.
    unsafe { ptr.write(value) }
}
