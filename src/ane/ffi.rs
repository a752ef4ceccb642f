//! Run-time binding to the Objective-C runtime, Foundation, CoreFoundation, IOSurface and the
//! private AppleNeuralEngine.framework (facts §5.1). Nothing is linked: every library is
//! `dlopen`ed on first use and every entry point is `dlsym`ed, so this file compiles the same
//! on Linux and macOS and only fails, with one sentence, when the libraries are absent.
//!
//! `objc_msgSend` has no type of its own: each call site must cast it to the exact C signature
//! of the method it sends (on arm64 a variadic or mistyped call passes arguments in the wrong
//! registers). Every signature used by the backend therefore has one small `send_*` helper
//! below, named after its C type, and nothing else transmutes the pointer.
//!
//! Memory: objects made by class factories (`stringWithUTF8String:`, `requestWithInputs:…`)
//! are autoreleased; callers hold a `Pool` around such calls and `retain` what must outlive it
//! into an `Obj`, which sends `release` when dropped.

use anyhow::{Context, Result, anyhow, bail};
use std::ffi::{CStr, CString, c_char, c_void};
use std::path::PathBuf;
use std::ptr::{NonNull, null_mut};
use std::sync::OnceLock;

/// An Objective-C object or class (`id`, `Class`).
pub type Id = *mut c_void;
/// A registered selector (`SEL`).
pub type Sel = *mut c_void;
/// `IOSurfaceRef`, a CoreFoundation object.
pub type SurfaceRaw = *mut c_void;
/// The untyped address of a C function, transmuted to its real signature before each call.
type Imp = unsafe extern "C" fn();

pub const OBJC_PATH: &str = "/usr/lib/libobjc.A.dylib";
pub const FOUNDATION_PATH: &str = "/System/Library/Frameworks/Foundation.framework/Foundation";
pub const CORE_FOUNDATION_PATH: &str = "/System/Library/Frameworks/CoreFoundation.framework/CoreFoundation";
pub const IOSURFACE_PATH: &str = "/System/Library/Frameworks/IOSurface.framework/IOSurface";
pub const ANE_PATH: &str = "/System/Library/PrivateFrameworks/AppleNeuralEngine.framework/AppleNeuralEngine";

/// `kIOSurfaceLockReadOnly`: the CPU will not write, so the lock need not flush on unlock.
pub const LOCK_READ_ONLY: u32 = 1;

/// The one-sentence failure of `dlopen`. glibc's and dyld's texts often begin with the path
/// itself; that prefix is dropped so the path appears once.
pub fn load_error(path: &str, dlerror: &str) -> String {
    let detail = dlerror.strip_prefix(path).map(|d| d.trim_start_matches(':').trim()).unwrap_or(dlerror.trim());
    format!(
        "the `ane` backend needs macOS on Apple silicon with AppleNeuralEngine.framework; could not load {path}: \
         {detail}. Use --backend cpu or --backend mil-sim on this machine."
    )
}

/// The failure to find a class, symbol or method in a library that did load: the OS is too
/// old or too new for the private API this backend was written against.
fn missing(what: &str, path: &str) -> String {
    format!(
        "the `ane` backend needs macOS on Apple silicon with AppleNeuralEngine.framework; {path} loaded but has no \
         {what}, so this macOS version is not supported. Use --backend cpu or --backend mil-sim on this machine."
    )
}

fn dlerror_text() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated thread-local string.
    let e = unsafe { libc::dlerror() };
    if e.is_null() { "unknown dlerror".into() } else { unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned() }
}

/// A library opened for the life of the process (never closed: classes it registers with the
/// Objective-C runtime cannot be unregistered).
struct Lib {
    path: &'static str,
    handle: *mut c_void,
}

impl Lib {
    fn open(path: &'static str) -> Result<Lib, String> {
        let c = CString::new(path).expect("library paths have no NUL");
        // SAFETY: a valid C string; RTLD_NOW resolves everything up front so that a broken
        // framework fails here rather than at the first call.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW) };
        if handle.is_null() { Err(load_error(path, &dlerror_text())) } else { Ok(Lib { path, handle }) }
    }

    fn sym(&self, name: &str) -> Result<Imp, String> {
        let c = CString::new(name).expect("symbol names have no NUL");
        // SAFETY: the handle is open and the name a valid C string.
        let p = unsafe { libc::dlsym(self.handle, c.as_ptr()) };
        if p.is_null() {
            return Err(missing(&format!("symbol `{name}` ({})", dlerror_text()), self.path));
        }
        // SAFETY: a non-null function address; callers transmute it to its real signature.
        Ok(unsafe { std::mem::transmute::<*mut c_void, Imp>(p) })
    }
}

/// Declares a struct of selectors and its registration from the selector names.
macro_rules! selectors {
    ($($field:ident = $name:literal,)*) => {
        /// Selectors, registered once.
        pub struct Sels { $(pub $field: Sel,)* }

        impl Sels {
            fn register(reg: unsafe extern "C" fn(*const c_char) -> Sel) -> Sels {
                // SAFETY: NUL-terminated literals; sel_registerName never fails.
                Sels { $($field: unsafe { reg(concat!($name, "\0").as_ptr().cast()) },)* }
            }
        }
    };
}

selectors! {
    retain = "retain",
    release = "release",
    description = "description",
    utf8_string = "UTF8String",
    responds = "respondsToSelector:",
    instances_respond = "instancesRespondToSelector:",
    string_with_utf8 = "stringWithUTF8String:",
    data_with_bytes = "dataWithBytes:length:",
    dictionary = "dictionaryWithObjects:forKeys:count:",
    array = "arrayWithObjects:count:",
    number_int = "numberWithInt:",
    number_u64 = "numberWithUnsignedLongLong:",
    model_with_mil = "modelWithMILText:weights:optionsPlist:",
    in_memory_model = "inMemoryModelWithDescriptor:",
    hex_id = "hexStringIdentifier",
    compile = "compileWithQoS:options:error:",
    load = "loadWithQoS:options:error:",
    evaluate = "evaluateWithQoS:options:request:error:",
    unload = "unloadWithQoS:error:",
    request = "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:",
    request5 = "requestWithInputs:inputIndices:outputs:outputIndices:procedureIndex:",
    all_values = "allValues",
    first_object = "firstObject",
    bytes = "bytes",
    object_with_surface = "objectWithIOSurface:",
    ane_sub_type = "aneSubType",
}

/// Classes the backend sends messages to.
pub struct Classes {
    pub string: Id,
    pub data: Id,
    pub dictionary: Id,
    pub array: Id,
    pub number: Id,
    pub descriptor: Id,
    pub model: Id,
    pub request: Id,
    pub surface_object: Id,
    /// `_ANEDeviceInfo`, only for the probe banner.
    pub device_info: Option<Id>,
}

/// Everything loaded, resolved and registered. One per process (see `api`).
pub struct Api {
    msg_send: Imp,
    pool_push: unsafe extern "C" fn() -> *mut c_void,
    pool_pop: unsafe extern "C" fn(*mut c_void),
    temporary_directory: unsafe extern "C" fn() -> Id,
    cf_release: unsafe extern "C" fn(*const c_void),
    surface_create: unsafe extern "C" fn(Id) -> SurfaceRaw,
    surface_lock: unsafe extern "C" fn(SurfaceRaw, u32, *mut u32) -> i32,
    surface_unlock: unsafe extern "C" fn(SurfaceRaw, u32, *mut u32) -> i32,
    surface_base: unsafe extern "C" fn(SurfaceRaw) -> *mut c_void,
    surface_alloc_size: unsafe extern "C" fn(SurfaceRaw) -> usize,
    pub cls: Classes,
    pub sel: Sels,
}

// SAFETY: after `Api::load` the struct is immutable; it holds C function addresses, registered
// selectors and class objects, all process-global and usable from any thread.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

/// The loaded API, or the one-sentence reason it cannot be loaded on this machine.
pub fn api() -> Result<&'static Api> {
    API.get_or_init(Api::load).as_ref().map_err(|e| anyhow!("{e}"))
}

/// Transmutes a resolved symbol to its C signature. Each use states that signature in full.
macro_rules! typed {
    ($imp:expr, $ty:ty) => {
        // SAFETY: the symbol is the named C function, whose prototype is `$ty`.
        unsafe { std::mem::transmute::<Imp, $ty>($imp) }
    };
}

impl Api {
    fn load() -> Result<Api, String> {
        // libobjc first: on a machine without it nothing else can work, and its absence is the
        // clearest message on Linux.
        let objc = Lib::open(OBJC_PATH)?;
        let foundation = Lib::open(FOUNDATION_PATH)?;
        let cf = Lib::open(CORE_FOUNDATION_PATH)?;
        let iosurface = Lib::open(IOSURFACE_PATH)?;
        let ane = Lib::open(ANE_PATH)?;

        let get_class = typed!(objc.sym("objc_getClass")?, unsafe extern "C" fn(*const c_char) -> Id);
        let sel_register = typed!(objc.sym("sel_registerName")?, unsafe extern "C" fn(*const c_char) -> Sel);
        let class = |name: &str, lib: &Lib| -> Result<Id, String> {
            let c = CString::new(name).expect("class names have no NUL");
            // SAFETY: objc_getClass takes a C string and returns nil for unknown classes.
            let cls = unsafe { get_class(c.as_ptr()) };
            if cls.is_null() { Err(missing(&format!("class `{name}`"), lib.path)) } else { Ok(cls) }
        };
        let cls = Classes {
            string: class("NSString", &foundation)?,
            data: class("NSData", &foundation)?,
            dictionary: class("NSDictionary", &foundation)?,
            array: class("NSArray", &foundation)?,
            number: class("NSNumber", &foundation)?,
            descriptor: class("_ANEInMemoryModelDescriptor", &ane)?,
            model: class("_ANEInMemoryModel", &ane)?,
            request: class("_ANERequest", &ane)?,
            surface_object: class("_ANEIOSurfaceObject", &ane)?,
            device_info: class("_ANEDeviceInfo", &ane).ok(),
        };
        let api = Api {
            msg_send: objc.sym("objc_msgSend")?,
            pool_push: typed!(objc.sym("objc_autoreleasePoolPush")?, unsafe extern "C" fn() -> *mut c_void),
            pool_pop: typed!(objc.sym("objc_autoreleasePoolPop")?, unsafe extern "C" fn(*mut c_void)),
            temporary_directory: typed!(foundation.sym("NSTemporaryDirectory")?, unsafe extern "C" fn() -> Id),
            cf_release: typed!(cf.sym("CFRelease")?, unsafe extern "C" fn(*const c_void)),
            surface_create: typed!(iosurface.sym("IOSurfaceCreate")?, unsafe extern "C" fn(Id) -> SurfaceRaw),
            surface_lock: typed!(
                iosurface.sym("IOSurfaceLock")?,
                unsafe extern "C" fn(SurfaceRaw, u32, *mut u32) -> i32
            ),
            surface_unlock: typed!(
                iosurface.sym("IOSurfaceUnlock")?,
                unsafe extern "C" fn(SurfaceRaw, u32, *mut u32) -> i32
            ),
            surface_base: typed!(
                iosurface.sym("IOSurfaceGetBaseAddress")?,
                unsafe extern "C" fn(SurfaceRaw) -> *mut c_void
            ),
            surface_alloc_size: typed!(
                iosurface.sym("IOSurfaceGetAllocSize")?,
                unsafe extern "C" fn(SurfaceRaw) -> usize
            ),
            cls,
            sel: Sels::register(sel_register),
        };
        api.check_methods(&ane)?;
        Ok(api)
    }

    /// Sending a selector an object does not implement raises an Objective-C exception, which
    /// aborts the process from Rust. Check every private method once, up front, instead.
    fn check_methods(&self, ane: &Lib) -> Result<(), String> {
        let (c, s) = (&self.cls, &self.sel);
        let class_methods = [
            (c.descriptor, s.model_with_mil, "+[_ANEInMemoryModelDescriptor modelWithMILText:weights:optionsPlist:]"),
            (c.model, s.in_memory_model, "+[_ANEInMemoryModel inMemoryModelWithDescriptor:]"),
            (c.surface_object, s.object_with_surface, "+[_ANEIOSurfaceObject objectWithIOSurface:]"),
        ];
        let instance_methods = [
            (s.hex_id, "-[_ANEInMemoryModel hexStringIdentifier]"),
            (s.compile, "-[_ANEInMemoryModel compileWithQoS:options:error:]"),
            (s.load, "-[_ANEInMemoryModel loadWithQoS:options:error:]"),
            (s.evaluate, "-[_ANEInMemoryModel evaluateWithQoS:options:request:error:]"),
            (s.unload, "-[_ANEInMemoryModel unloadWithQoS:error:]"),
        ];
        // Some macOS builds lack the 7-argument request factory; the 5-argument one (no
        // weightsBuffer, no perfStats — always nil here) serves as well.
        // SAFETY: every class answers +respondsToSelector: (NSObject).
        let has = |sel| unsafe { self.send_bool_sel(c.request, s.responds, sel) };
        if !has(s.request) && !has(s.request5) {
            return Err(missing("method +[_ANERequest requestWithInputs:…procedureIndex:]", ane.path));
        }
        for (cls, sel, what) in class_methods {
            // SAFETY: every class answers +respondsToSelector: (NSObject).
            if !unsafe { self.send_bool_sel(cls, s.responds, sel) } {
                return Err(missing(&format!("method {what}"), ane.path));
            }
        }
        for (sel, what) in instance_methods {
            // SAFETY: every class answers +instancesRespondToSelector: (NSObject).
            if !unsafe { self.send_bool_sel(c.model, s.instances_respond, sel) } {
                return Err(missing(&format!("method {what}"), ane.path));
            }
        }
        Ok(())
    }

    // ---- objc_msgSend, one helper per C signature. Safety for all: `recv` is a live object
    // (or class) that implements `sel` with exactly the signature in the helper's name, and
    // pointer arguments are valid for the callee. BOOL is read as `i8` (signed char on x86_64,
    // _Bool in the low byte on arm64).

    /// `id (id, SEL)`
    pub unsafe fn send_id(&self, recv: Id, sel: Sel) -> Id {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel) -> Id);
        unsafe { f(recv, sel) }
    }

    /// `void (id, SEL)`
    pub unsafe fn send_void(&self, recv: Id, sel: Sel) {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel));
        unsafe { f(recv, sel) }
    }

    /// `const char * (id, SEL)`
    pub unsafe fn send_cstr(&self, recv: Id, sel: Sel) -> *const c_char {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel) -> *const c_char);
        unsafe { f(recv, sel) }
    }

    /// `BOOL (id, SEL, SEL)`
    pub unsafe fn send_bool_sel(&self, recv: Id, sel: Sel, arg: Sel) -> bool {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, Sel) -> i8);
        unsafe { f(recv, sel, arg) != 0 }
    }

    /// `id (id, SEL, const char *)`
    pub unsafe fn send_id_cstr(&self, recv: Id, sel: Sel, s: *const c_char) -> Id {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, *const c_char) -> Id);
        unsafe { f(recv, sel, s) }
    }

    /// `id (id, SEL, const void *, NSUInteger)`
    pub unsafe fn send_id_bytes(&self, recv: Id, sel: Sel, p: *const c_void, n: usize) -> Id {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, *const c_void, usize) -> Id);
        unsafe { f(recv, sel, p, n) }
    }

    /// `id (id, SEL, const id *, NSUInteger)`
    pub unsafe fn send_id_objs(&self, recv: Id, sel: Sel, objs: *const Id, n: usize) -> Id {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, *const Id, usize) -> Id);
        unsafe { f(recv, sel, objs, n) }
    }

    /// `id (id, SEL, const id *, const id *, NSUInteger)`
    pub unsafe fn send_id_objs_keys(&self, recv: Id, sel: Sel, objs: *const Id, keys: *const Id, n: usize) -> Id {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, *const Id, *const Id, usize) -> Id);
        unsafe { f(recv, sel, objs, keys, n) }
    }

    /// `id (id, SEL, int)`
    pub unsafe fn send_id_i32(&self, recv: Id, sel: Sel, v: i32) -> Id {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, i32) -> Id);
        unsafe { f(recv, sel, v) }
    }

    /// `id (id, SEL, unsigned long long)`
    pub unsafe fn send_id_u64(&self, recv: Id, sel: Sel, v: u64) -> Id {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, u64) -> Id);
        unsafe { f(recv, sel, v) }
    }

    /// `id (id, SEL, id)` (also `IOSurfaceRef` arguments, which are object pointers)
    pub unsafe fn send_id_id(&self, recv: Id, sel: Sel, a: Id) -> Id {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, Id) -> Id);
        unsafe { f(recv, sel, a) }
    }

    /// `id (id, SEL, id, id, id)`
    pub unsafe fn send_id_3id(&self, recv: Id, sel: Sel, a: Id, b: Id, c: Id) -> Id {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, Id, Id, Id) -> Id);
        unsafe { f(recv, sel, a, b, c) }
    }

    /// `BOOL (Class, SEL, SEL)` for +respondsToSelector: on the request class: which factory.
    pub fn has_request7(&self) -> bool {
        // SAFETY: every class answers +respondsToSelector:.
        unsafe { self.send_bool_sel(self.cls.request, self.sel.responds, self.sel.request) }
    }

    /// `id (id, SEL, id, id, id, id, id)`
    pub unsafe fn send_id_5id(&self, recv: Id, sel: Sel, a: [Id; 5]) -> Id {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, Id, Id, Id, Id, Id) -> Id);
        unsafe { f(recv, sel, a[0], a[1], a[2], a[3], a[4]) }
    }

    /// `id (id, SEL, id, id, id, id, id, id, id)`
    pub unsafe fn send_id_7id(&self, recv: Id, sel: Sel, a: [Id; 7]) -> Id {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, Id, Id, Id, Id, Id, Id, Id) -> Id);
        unsafe { f(recv, sel, a[0], a[1], a[2], a[3], a[4], a[5], a[6]) }
    }

    /// `BOOL (id, SEL, unsigned int qos, id options, NSError **)` — compile, load
    pub unsafe fn send_bool_qos_opts_err(&self, recv: Id, sel: Sel, qos: u32, opts: Id, err: *mut Id) -> bool {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, u32, Id, *mut Id) -> i8);
        unsafe { f(recv, sel, qos, opts, err) != 0 }
    }

    /// `BOOL (id, SEL, unsigned int qos, id options, id request, NSError **)` — evaluate
    pub unsafe fn send_bool_qos_opts_req_err(
        &self,
        recv: Id,
        sel: Sel,
        qos: u32,
        opts: Id,
        req: Id,
        err: *mut Id,
    ) -> bool {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, u32, Id, Id, *mut Id) -> i8);
        unsafe { f(recv, sel, qos, opts, req, err) != 0 }
    }

    /// `BOOL (id, SEL, unsigned int qos, NSError **)` — unload
    pub unsafe fn send_bool_qos_err(&self, recv: Id, sel: Sel, qos: u32, err: *mut Id) -> bool {
        let f = typed!(self.msg_send, unsafe extern "C" fn(Id, Sel, u32, *mut Id) -> i8);
        unsafe { f(recv, sel, qos, err) != 0 }
    }

    // ---- Foundation values. Results are autoreleased: hold a `Pool`.

    pub fn pool(&self) -> Pool<'_> {
        // SAFETY: push/pop are balanced by `Pool::drop`.
        Pool { api: self, token: unsafe { (self.pool_push)() } }
    }

    pub fn string(&self, s: &str) -> Result<Id> {
        let c = CString::new(s).with_context(|| format!("string {s:?} contains a NUL byte"))?;
        // SAFETY: +[NSString stringWithUTF8String:] copies the C string.
        non_nil(unsafe { self.send_id_cstr(self.cls.string, self.sel.string_with_utf8, c.as_ptr()) }, "NSString")
    }

    pub fn data(&self, bytes: &[u8]) -> Result<Id> {
        // SAFETY: +[NSData dataWithBytes:length:] copies `bytes`.
        let d =
            unsafe { self.send_id_bytes(self.cls.data, self.sel.data_with_bytes, bytes.as_ptr().cast(), bytes.len()) };
        non_nil(d, "NSData")
    }

    pub fn number_u64(&self, v: u64) -> Result<Id> {
        // SAFETY: +[NSNumber numberWithUnsignedLongLong:].
        non_nil(unsafe { self.send_id_u64(self.cls.number, self.sel.number_u64, v) }, "NSNumber")
    }

    pub fn number_i32(&self, v: i32) -> Result<Id> {
        // SAFETY: +[NSNumber numberWithInt:].
        non_nil(unsafe { self.send_id_i32(self.cls.number, self.sel.number_int, v) }, "NSNumber")
    }

    /// # Safety
    /// Every element of `keys` and `values` is a live object.
    pub unsafe fn dictionary(&self, keys: &[Id], values: &[Id]) -> Result<Id> {
        assert_eq!(keys.len(), values.len());
        let (c, s) = (self.cls.dictionary, self.sel.dictionary);
        non_nil(unsafe { self.send_id_objs_keys(c, s, values.as_ptr(), keys.as_ptr(), keys.len()) }, "NSDictionary")
    }

    /// # Safety
    /// Every element of `objs` is a live object.
    pub unsafe fn array(&self, objs: &[Id]) -> Result<Id> {
        non_nil(unsafe { self.send_id_objs(self.cls.array, self.sel.array, objs.as_ptr(), objs.len()) }, "NSArray")
    }

    /// A copy of an NSString's UTF-8 text ("" for nil).
    ///
    /// # Safety
    /// `s` is nil or a live NSString.
    pub unsafe fn text(&self, s: Id) -> String {
        if s.is_null() {
            return String::new();
        }
        let p = unsafe { self.send_cstr(s, self.sel.utf8_string) };
        if p.is_null() { String::new() } else { unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned() }
    }

    /// `[obj description]` as text; for an NSError it carries the domain, code and reason.
    ///
    /// # Safety
    /// `obj` is nil or a live object.
    pub unsafe fn describe(&self, obj: Id) -> String {
        if obj.is_null() {
            return "(no NSError was returned)".into();
        }
        // An NSError's description spans lines (its userInfo dictionary); errors here are one.
        let text = unsafe { self.text(self.send_id(obj, self.sel.description)) };
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// Takes a +1 reference on `obj` so that it outlives the current pool.
    ///
    /// # Safety
    /// `obj` is nil or a live object.
    pub unsafe fn retain(&'static self, obj: Id, what: &str) -> Result<Obj> {
        let obj = non_nil(obj, what)?;
        unsafe { self.send_id(obj, self.sel.retain) };
        Ok(Obj { api: self, ptr: NonNull::new(obj).expect("checked non-nil") })
    }

    /// `NSTemporaryDirectory()`: the per-user directory under which the framework itself puts
    /// `<hexStringIdentifier>/` (facts §5.2 step 4). `$TMPDIR` may differ from it, so it is
    /// asked for rather than guessed.
    pub fn temporary_directory(&self) -> Result<PathBuf> {
        let _pool = self.pool();
        // SAFETY: NSTemporaryDirectory() returns an autoreleased NSString, read inside the pool.
        let dir = unsafe { self.text((self.temporary_directory)()) };
        if dir.is_empty() {
            bail!("NSTemporaryDirectory() returned nothing; set TMPDIR to a writable directory and retry");
        }
        Ok(PathBuf::from(dir))
    }

    // ---- IOSurface. Safety for all: `s` is a live surface from `surface_create`.

    /// # Safety
    /// `props` is a live NSDictionary (toll-free bridged to CFDictionaryRef).
    pub unsafe fn surface_create(&self, props: Id) -> SurfaceRaw {
        unsafe { (self.surface_create)(props) }
    }

    pub unsafe fn surface_lock(&self, s: SurfaceRaw, flags: u32) -> i32 {
        unsafe { (self.surface_lock)(s, flags, null_mut()) }
    }

    pub unsafe fn surface_unlock(&self, s: SurfaceRaw, flags: u32) -> i32 {
        unsafe { (self.surface_unlock)(s, flags, null_mut()) }
    }

    pub unsafe fn surface_base(&self, s: SurfaceRaw) -> *mut c_void {
        unsafe { (self.surface_base)(s) }
    }

    pub unsafe fn surface_alloc_size(&self, s: SurfaceRaw) -> usize {
        unsafe { (self.surface_alloc_size)(s) }
    }

    /// # Safety
    /// `cf` is a live CoreFoundation object on which the caller owns one reference.
    pub unsafe fn cf_release(&self, cf: *const c_void) {
        unsafe { (self.cf_release)(cf) }
    }
}

fn non_nil(obj: Id, what: &str) -> Result<Id> {
    if obj.is_null() {
        Err(anyhow!("Foundation returned nil for a new {what}; the process may be out of memory"))
    } else {
        Ok(obj)
    }
}

/// An autorelease pool, popped on drop: objects autoreleased inside die here.
pub struct Pool<'a> {
    api: &'a Api,
    token: *mut c_void,
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        // SAFETY: the token came from the matching push on this thread (Pool is !Send).
        unsafe { (self.api.pool_pop)(self.token) }
    }
}

/// An object this process holds one reference on; `release`d on drop.
pub struct Obj {
    api: &'static Api,
    ptr: NonNull<c_void>,
}

impl Obj {
    pub fn ptr(&self) -> Id {
        self.ptr.as_ptr()
    }
}

impl Drop for Obj {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `Api::retain`.
        unsafe { self.api.send_void(self.ptr.as_ptr(), self.api.sel.release) }
    }
}

// SAFETY: retain/release are thread-safe, and the runner that owns these objects is used by one
// thread at a time (`&mut self`); the framework's models are usable from any thread (facts §5.7:
// compile and eval from different threads).
unsafe impl Send for Obj {}
