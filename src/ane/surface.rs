//! One IOSurface holding one fp16 tensor at its start, and its `_ANEIOSurfaceObject` wrapper
//! (facts §5.3). The CPU reaches the data only between `IOSurfaceLock` and `IOSurfaceUnlock`.

use super::ffi::{Api, LOCK_READ_ONLY, Obj, SurfaceRaw};
use super::layout::surface_properties;
use anyhow::{Result, bail, ensure};
use half::f16;
use std::ptr::NonNull;

/// The +1 reference from `IOSurfaceCreate`, released on drop.
struct SurfaceRef {
    api: &'static Api,
    raw: NonNull<std::ffi::c_void>,
}

impl Drop for SurfaceRef {
    fn drop(&mut self) {
        // SAFETY: balances IOSurfaceCreate (the Create rule).
        unsafe { self.api.cf_release(self.raw.as_ptr()) }
    }
}

// SAFETY: IOSurfaces are kernel objects usable from any thread; access to the memory is
// serialised by the lock and by the runner's `&mut self`.
unsafe impl Send for SurfaceRef {}

pub struct Surface {
    /// `_ANEIOSurfaceObject`; holds its own reference on the surface.
    object: Obj,
    surface: SurfaceRef,
    bytes: usize,
}

impl Surface {
    /// A flat surface of `bytes` (already rounded by `layout::surface_bytes`) and its wrapper.
    /// Call inside an autorelease pool.
    pub fn new(api: &'static Api, bytes: usize) -> Result<Surface> {
        let props = surface_properties(bytes);
        let mut keys = [std::ptr::null_mut(); 6];
        let mut values = [std::ptr::null_mut(); 6];
        for (i, (k, v)) in props.iter().enumerate() {
            keys[i] = api.string(k)?;
            values[i] = api.number_u64(*v)?;
        }
        // SAFETY: keys and values are live autoreleased objects; NSDictionary is toll-free
        // bridged to the CFDictionaryRef that IOSurfaceCreate takes.
        let raw = unsafe { api.surface_create(api.dictionary(&keys, &values)?) };
        let Some(raw) = NonNull::new(raw) else {
            bail!("IOSurfaceCreate refused a {bytes}-byte surface; the system may be out of memory")
        };
        let surface = SurfaceRef { api, raw };
        // SAFETY: a live surface.
        let alloc = unsafe { api.surface_alloc_size(raw.as_ptr()) };
        ensure!(alloc >= bytes, "IOSurfaceCreate allocated {alloc} bytes where {bytes} were asked for");
        // SAFETY: +[_ANEIOSurfaceObject objectWithIOSurface:] takes an IOSurfaceRef.
        let object = unsafe {
            let o = api.send_id_id(api.cls.surface_object, api.sel.object_with_surface, raw.as_ptr());
            api.retain(o, "_ANEIOSurfaceObject")?
        };
        Ok(Surface { object, surface, bytes })
    }

    /// The `_ANEIOSurfaceObject` to put in requests.
    pub fn object(&self) -> &Obj {
        &self.object
    }

    /// Gives `fill` the first `elems` fp16 values, locked for writing.
    pub fn write(&self, elems: usize, fill: &mut dyn FnMut(&mut [f16])) -> Result<()> {
        self.locked(elems, 0, &mut |base| {
            // SAFETY: the surface is locked, its base is page-aligned (so f16-aligned) and at
            // least `elems`·2 bytes long (checked in `locked`); nothing else aliases it while
            // the runner holds `&mut self`.
            fill(unsafe { std::slice::from_raw_parts_mut(base.as_ptr(), elems) })
        })
    }

    /// Gives `read` the first `elems` fp16 values, locked read-only.
    pub fn read(&self, elems: usize, read: &mut dyn FnMut(&[f16])) -> Result<()> {
        self.locked(elems, LOCK_READ_ONLY, &mut |base| {
            // SAFETY: as in `write`; read-only.
            read(unsafe { std::slice::from_raw_parts(base.as_ptr(), elems) })
        })
    }

    fn locked(&self, elems: usize, flags: u32, body: &mut dyn FnMut(NonNull<f16>)) -> Result<()> {
        ensure!(2 * elems <= self.bytes, "a {elems}-element view does not fit a {}-byte surface", self.bytes);
        let (api, raw) = (self.surface.api, self.surface.raw.as_ptr());
        // SAFETY: a live surface; seed pointer null.
        let rc = unsafe { api.surface_lock(raw, flags) };
        ensure!(rc == 0, "IOSurfaceLock failed with IOReturn {rc:#x}; the surface may be in use by the Neural Engine");
        let guard = Unlock { api, raw, flags, armed: true };
        // SAFETY: a locked surface has a base address for as long as it stays locked.
        let base = unsafe { api.surface_base(raw) };
        let Some(base) = NonNull::new(base.cast::<f16>()) else { bail!("IOSurfaceGetBaseAddress returned null") };
        ensure!(base.as_ptr().is_aligned(), "IOSurface base address {base:p} is not 2-byte aligned");
        body(base);
        guard.unlock()
    }
}

/// Unlocks on drop if `body` panicked; the normal path calls `unlock` to see the return code.
struct Unlock {
    api: &'static Api,
    raw: SurfaceRaw,
    flags: u32,
    armed: bool,
}

impl Unlock {
    fn unlock(mut self) -> Result<()> {
        self.armed = false;
        // SAFETY: balances the lock taken with the same flags.
        let rc = unsafe { self.api.surface_unlock(self.raw, self.flags) };
        ensure!(rc == 0, "IOSurfaceUnlock failed with IOReturn {rc:#x}");
        Ok(())
    }
}

impl Drop for Unlock {
    fn drop(&mut self) {
        if self.armed {
            // SAFETY: as in `unlock`; a panic is already propagating, so the code is moot.
            unsafe { self.api.surface_unlock(self.raw, self.flags) };
        }
    }
}
