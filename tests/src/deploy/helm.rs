//! The real Helm engine (v4.3.0's `action` package), from PyPI's `helm-sdkpy` library, driven
//! through its C ABI as the `helm` command drives the same package: install, upgrade,
//! uninstall, lint, against a cluster named by a kubeconfig. `cargo xtask test` fetches it
//! (`xtask/src/helm.rs`) and names it in `SLUICE_HELM_LIB`.
//!
//! The library is a Go runtime; it is loaded once per process and never unloaded.
use std::{
    ffi::{CStr, CString, c_char, c_int},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// Set by `cargo xtask test`; keep the default in step with `xtask/src/helm.rs`.
pub const LIB_VAR: &str = "SLUICE_HELM_LIB";
const DEFAULT: &str = "helm-sdkpy-0.1.32/libhelm_sdkpy.so";

type ConfigCreate = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const c_char,
    *const c_char,
    *mut u64,
) -> c_int;
type ConfigDestroy = unsafe extern "C" fn(u64);
type Release = unsafe extern "C" fn(
    u64,
    *const c_char,
    *const c_char,
    *const c_char,
    *const c_char,
    *const c_char,
    *mut *mut c_char,
) -> c_int;
type Uninstall = unsafe extern "C" fn(u64, *const c_char, c_int, c_int, *mut *mut c_char) -> c_int;
type Lint = unsafe extern "C" fn(u64, *const c_char, *mut *mut c_char) -> c_int;
type LastError = unsafe extern "C" fn() -> *const c_char;
type Free = unsafe extern "C" fn(*mut std::ffi::c_void);

/// The loaded library.
pub struct Helm {
    lib: libloading::Library,
}

static LOADED: OnceLock<std::result::Result<Helm, String>> = OnceLock::new();

impl Helm {
    /// The library from `SLUICE_HELM_LIB` or xtask's cache, loaded (once per process); `None`
    /// where it is missing outside CI.
    pub fn locate() -> Result<Option<&'static Helm>> {
        let path = std::env::var_os(LIB_VAR)
            .map(PathBuf::from)
            .unwrap_or_else(|| super::cache_dir().join(DEFAULT));
        let Some(path) = super::prerequisite(path, "Helm library (helm-sdkpy)")? else {
            return Ok(None);
        };
        let loaded = LOADED.get_or_init(|| Helm::load(&path).map_err(|e| format!("{e:#}")));
        match loaded {
            Ok(helm) => Ok(Some(helm)),
            Err(e) => bail!("{e}"),
        }
    }

    fn load(path: &Path) -> Result<Helm> {
        // SAFETY: the library's initialisers start the Go runtime and touch nothing of ours.
        let lib = unsafe { libloading::Library::new(path) }
            .with_context(|| format!("loading {}", path.display()))?;
        Ok(Helm { lib })
    }

    fn symbol<T: Copy>(&self, name: &str) -> Result<T> {
        // SAFETY: each name is looked up with the signature of its C declaration
        // (libhelm_sdkpy.h of helm-sdkpy 0.1.32).
        unsafe {
            self.lib
                .get::<T>(name.as_bytes())
                .map(|s| *s)
                .with_context(|| format!("no {name} in the Helm library"))
        }
    }

    /// A client for release namespace `namespace` of the cluster in `kubeconfig`.
    pub fn client(&self, namespace: &str, kubeconfig: &Path) -> Result<HelmClient<'_>> {
        let create: ConfigCreate = self.symbol("helm_sdkpy_config_create")?;
        let ns = cstring(namespace)?;
        let kc = cstring(&kubeconfig.display().to_string())?;
        let (ctx, opts) = (cstring("")?, cstring("{}")?);
        let mut handle = 0u64;
        // SAFETY: valid C strings and an out pointer that lives through the call.
        let rc = unsafe {
            create(
                ns.as_ptr(),
                kc.as_ptr(),
                ctx.as_ptr(),
                opts.as_ptr(),
                &mut handle,
            )
        };
        self.check(rc, "creating a Helm configuration")?;
        Ok(HelmClient { helm: self, handle })
    }

    /// The calling thread's last error (the library keeps one per thread).
    fn check(&self, rc: c_int, what: &str) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        let last: LastError = self.symbol("helm_sdkpy_last_error")?;
        // SAFETY: a NUL-terminated string owned by the library (or NULL), read at once.
        let msg = unsafe {
            let p = last();
            if p.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        bail!("{what}: {msg}")
    }

    /// Takes a result string the library allocated, and frees it.
    fn take(&self, p: *mut c_char) -> Result<String> {
        if p.is_null() {
            return Ok(String::new());
        }
        let free: Free = self.symbol("helm_sdkpy_free")?;
        // SAFETY: `p` is a NUL-terminated string from the library, freed exactly once.
        unsafe {
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            free(p.cast());
            Ok(s)
        }
    }
}

/// One Helm configuration (namespace, cluster): `helm -n <ns> --kubeconfig <file>`.
pub struct HelmClient<'a> {
    helm: &'a Helm,
    handle: u64,
}

impl HelmClient<'_> {
    /// `helm install <release> <chart> --values <values>`; `options` are the library's
    /// (`create_namespace`, `take_ownership`, `wait`...; `wait` is off unless set: nothing
    /// runs the pods of the test API server). Returns the release: its `manifest` is the
    /// rendered chart.
    pub fn install(
        &self,
        release: &str,
        chart: &Path,
        values: &Value,
        options: &Value,
    ) -> Result<Value> {
        self.release("helm_sdkpy_install", release, chart, values, options)
    }

    /// `helm upgrade <release> <chart> --values <values>` (options as for install, plus
    /// `reuse_values`, `reset_values`, `install`).
    pub fn upgrade(
        &self,
        release: &str,
        chart: &Path,
        values: &Value,
        options: &Value,
    ) -> Result<Value> {
        self.release("helm_sdkpy_upgrade", release, chart, values, options)
    }

    fn release(
        &self,
        func: &str,
        release: &str,
        chart: &Path,
        values: &Value,
        options: &Value,
    ) -> Result<Value> {
        let f: Release = self.helm.symbol(func)?;
        let mut all = serde_json::json!({"wait": false});
        if let (Some(all), Some(given)) = (all.as_object_mut(), options.as_object()) {
            all.extend(given.clone());
        }
        let options = &all;
        let (name, path) = (cstring(release)?, cstring(&chart.display().to_string())?);
        let (values, version, options) = (
            cstring(&values.to_string())?,
            cstring("")?,
            cstring(&options.to_string())?,
        );
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: valid C strings and an out pointer that lives through the call.
        let rc = unsafe {
            f(
                self.handle,
                name.as_ptr(),
                path.as_ptr(),
                values.as_ptr(),
                version.as_ptr(),
                options.as_ptr(),
                &mut out,
            )
        };
        self.helm.check(rc, func)?;
        let json = self.helm.take(out)?;
        serde_json::from_str(&json).with_context(|| format!("{func} returned {json:?}"))
    }

    /// `helm uninstall <release>` (not waiting for the objects to go).
    pub fn uninstall(&self, release: &str) -> Result<Value> {
        let f: Uninstall = self.helm.symbol("helm_sdkpy_uninstall")?;
        let name = cstring(release)?;
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: as above.
        let rc = unsafe { f(self.handle, name.as_ptr(), 0, 60, &mut out) };
        self.helm.check(rc, "helm_sdkpy_uninstall")?;
        let json = self.helm.take(out)?;
        Ok(serde_json::from_str(&json).unwrap_or(Value::String(json)))
    }

    /// `helm lint <chart>`: the linter's report.
    pub fn lint(&self, chart: &Path) -> Result<Value> {
        let f: Lint = self.helm.symbol("helm_sdkpy_lint")?;
        let path = cstring(&chart.display().to_string())?;
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: as above.
        let rc = unsafe { f(self.handle, path.as_ptr(), &mut out) };
        self.helm.check(rc, "helm_sdkpy_lint")?;
        let json = self.helm.take(out)?;
        serde_json::from_str(&json).with_context(|| format!("lint returned {json:?}"))
    }
}

impl Drop for HelmClient<'_> {
    fn drop(&mut self) {
        if let Ok(destroy) = self
            .helm
            .symbol::<ConfigDestroy>("helm_sdkpy_config_destroy")
        {
            // SAFETY: our own handle, destroyed once.
            unsafe { destroy(self.handle) };
        }
    }
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).with_context(|| format!("{s:?} has a NUL byte"))
}
