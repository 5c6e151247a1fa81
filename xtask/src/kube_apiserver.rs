//! `cargo xtask kube-apiserver`: a real Kubernetes API server (and etcd) for the tests, built
//! once and cached outside the clone.
//!
//! Debian carries no kube-apiserver binary, but bookworm's `kubernetes` source package is the
//! full upstream v1.20.2 tree with `vendor/`. It builds with Go 1.15 (bullseye's
//! `golang-1.15-go`; the vendored reflect2 breaks on Go ≥ 1.18) once the one generated file
//! the tarball lacks, `pkg/generated/openapi/zz_generated.openapi.go`, is made with the
//! tree's own `openapi-gen`. etcd is bookworm's `etcd-server`.
//!
//! Everything is fetched with apt through a private configuration (own source list, lists and
//! cache directories) whose lines reuse the machine's own Debian mirror, so the machine's apt
//! setup is not touched and nothing is installed: the packages are unpacked with `dpkg-deb -x`
//! into a scratch directory that is removed afterwards. The result is
//! `${XDG_CACHE_HOME:-~/.cache}/sluice/kube-apiserver-v1.20.2/bin/{kube-apiserver,etcd}`.
use std::{
    collections::BTreeSet,
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The Kubernetes release in bookworm's `kubernetes` source package.
pub const KUBE_VERSION: &str = "v1.20.2";
/// Debian suites: the kubernetes source and etcd come from bookworm, Go 1.15 from bullseye.
const SOURCE_SUITE: &str = "bookworm";
const GO_SUITE: &str = "bullseye";
const GO_PACKAGES: &[&str] = &["golang-1.15-go", "golang-1.15-src"];
const GO_ROOT: &str = "usr/lib/go-1.15";
/// Where the version variables live that `-X` sets (kube's hack/lib/version.sh); unset, the
/// server reports an empty `/version`.
const VERSION_PACKAGES: &[&str] = &[
    "k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version",
    "k8s.io/kubernetes/vendor/k8s.io/component-base/version",
];

/// Where the binaries are cached, keyed by version.
pub fn cache_dir() -> Result<PathBuf> {
    crate::cache_dir(&format!("kube-apiserver-{KUBE_VERSION}"))
}

/// Returns the directory holding `kube-apiserver` and `etcd`, building them first if missing.
pub fn ensure() -> Result<PathBuf> {
    let dir = cache_dir()?;
    let bin = dir.join("bin");
    let present = ["kube-apiserver", "etcd"]
        .iter()
        .all(|b| bin.join(b).is_file());
    eprintln!(
        "checking kube-apiserver {KUBE_VERSION} and etcd in {}… {}",
        bin.display(),
        if present { "present" } else { "missing" }
    );
    if present {
        return Ok(bin);
    }
    let started = Instant::now();
    build(&dir)?;
    eprintln!(
        "kube-apiserver {KUBE_VERSION} and etcd built in {}s, cached in {}",
        started.elapsed().as_secs(),
        bin.display()
    );
    Ok(bin)
}

fn build(dest: &Path) -> Result<()> {
    let parent = dest.parent().context("cache dir has a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    // A scratch directory beside the cache entry, so the finished entry is renamed into place
    // (two builds racing each other both succeed; the first rename wins).
    let scratch = parent.join(format!(
        "kube-apiserver-{KUBE_VERSION}.build-{}",
        std::process::id()
    ));
    let _cleanup = RemoveOnDrop(scratch.clone());
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir_all(&scratch)?;

    let apt = PrivateApt::new(&scratch.join("apt"), &debian_mirror()?)?;
    eprintln!(
        "fetching package lists for {SOURCE_SUITE} (sources, etcd) and {GO_SUITE} (Go 1.15)…"
    );
    apt.run(Command::new("apt-get").arg("update"))?;

    let downloads = scratch.join("downloads");
    fs::create_dir_all(&downloads)?;
    eprintln!("downloading the kubernetes source package, Go 1.15 and etcd…");
    apt.run(
        Command::new("apt-get")
            .current_dir(&downloads)
            .args(["source", "--download-only"])
            .arg(format!("kubernetes/{SOURCE_SUITE}")),
    )?;
    let mut debs: Vec<String> = GO_PACKAGES
        .iter()
        .map(|p| format!("{p}/{GO_SUITE}"))
        .collect();
    debs.push(format!("etcd-server/{SOURCE_SUITE}"));
    apt.run(
        Command::new("apt-get")
            .current_dir(&downloads)
            .arg("download")
            .args(&debs),
    )?;

    let tools = scratch.join("tools");
    for deb in files_ending(&downloads, ".deb")? {
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tools))?;
    }
    let goroot = tools.join(GO_ROOT);
    let etcd = tools.join("usr/bin/etcd");

    // The upstream tree goes straight to $GOPATH/src/k8s.io/kubernetes: the build runs in
    // GOPATH mode with vendor/, as kube's own hack/ scripts do.
    let gopath = scratch.join("gopath");
    let k8s_dir = gopath.join("src/k8s.io");
    fs::create_dir_all(&k8s_dir)?;
    let orig = files_ending(&downloads, ".orig.tar.gz")?
        .into_iter()
        .next()
        .context("the kubernetes source package has no .orig.tar.gz")?;
    eprintln!("unpacking {}…", file_name(&orig));
    cmd::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&orig)
            .arg("-C")
            .arg(&k8s_dir),
    )?;
    let unpacked = k8s_dir.join(format!("kubernetes-{}", &KUBE_VERSION[1..]));
    if !unpacked.is_dir() {
        bail!(
            "the kubernetes source package is not {KUBE_VERSION}: no {}",
            unpacked.display()
        );
    }
    let tree = k8s_dir.join("kubernetes");
    fs::rename(&unpacked, &tree)?;

    let go = GoEnv {
        goroot,
        gopath,
        gocache: scratch.join("gocache"),
        tree: tree.clone(),
    };
    eprintln!("building openapi-gen…");
    let openapi_gen = scratch.join("openapi-gen");
    go.run(
        go.cmd()
            .args(["build", "-o"])
            .arg(&openapi_gen)
            .arg("./vendor/k8s.io/kube-openapi/cmd/openapi-gen"),
    )?;
    generate_openapi(&go, &openapi_gen, &scratch)?;

    eprintln!("building kube-apiserver {KUBE_VERSION} (a few minutes)…");
    let out = scratch.join("out/bin");
    fs::create_dir_all(&out)?;
    go.run(
        go.cmd()
            .arg("build")
            .arg("-ldflags")
            .arg(version_ldflags())
            .arg("-o")
            .arg(out.join("kube-apiserver"))
            .arg("./cmd/kube-apiserver"),
    )?;
    fs::copy(&etcd, out.join("etcd")).with_context(|| format!("copying {}", etcd.display()))?;
    fs::write(
        scratch.join("out/BUILD-INFO"),
        format!(
            "kube-apiserver {KUBE_VERSION} from Debian {SOURCE_SUITE}'s `kubernetes` source package ({}),\n\
             built with Go 1.15 from Debian {GO_SUITE}; etcd from Debian {SOURCE_SUITE}'s etcd-server.\n",
            file_name(&orig)
        ),
    )?;

    match fs::rename(scratch.join("out"), dest) {
        Ok(()) => Ok(()),
        // Another build finished first; its result is as good as ours.
        Err(_) if dest.join("bin/kube-apiserver").is_file() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("moving the build to {}", dest.display())),
    }
}

/// `pkg/generated/openapi/zz_generated.openapi.go`, as kube's Makefile.generated_files makes
/// it: every Go package (staging named as vendor/) with a `+k8s:openapi-gen=` tag, except the
/// code-generator and sample-apiserver ones. The API-rule report must then equal the tree's
/// known-violations list, which proves the same set of types went in.
fn generate_openapi(go: &GoEnv, openapi_gen: &Path, scratch: &Path) -> Result<()> {
    let dirs = openapi_dirs(&go.tree)?;
    eprintln!(
        "generating pkg/generated/openapi from {} API packages…",
        dirs.len()
    );
    let inputs: Vec<String> = dirs
        .iter()
        .map(|d| format!("k8s.io/kubernetes/{d}"))
        .collect();
    let report = scratch.join("openapi-violations.report");
    go.run(
        go.env(&mut Command::new(openapi_gen))
            .arg("-i")
            .arg(inputs.join(","))
            .args(["-p", "k8s.io/kubernetes/pkg/generated/openapi"])
            .args(["-O", "zz_generated.openapi"])
            .args(["-h", "vendor/k8s.io/code-generator/hack/boilerplate.go.txt"])
            .arg("-r")
            .arg(&report),
    )?;
    let known = go.tree.join("api/api-rules/violation_exceptions.list");
    if fs::read(&report)? != fs::read(&known)? {
        bail!(
            "openapi-gen's API rule report {} differs from {}: the generator saw a different set of packages",
            report.display(),
            known.display()
        );
    }
    Ok(())
}

/// The package directories (relative to the tree) that ask for OpenAPI generation.
fn openapi_dirs(tree: &Path) -> Result<BTreeSet<String>> {
    let mut dirs = BTreeSet::new();
    let mut stack = vec![(tree.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut tagged = false;
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                // kube's cache_go_dirs.sh prunes ./_*, ./.* and ./vendor at the top only;
                // staging/src stands in for the vendor/k8s.io symlinks.
                let top = rel.is_empty();
                if top && (name.starts_with('_') || name.starts_with('.') || name == "vendor") {
                    continue;
                }
                let child = if top { name } else { format!("{rel}/{name}") };
                stack.push((entry.path(), child));
            } else if kind.is_file() && name.ends_with(".go") && !tagged {
                let text = fs::read_to_string(entry.path()).unwrap_or_default();
                tagged = has_openapi_tag(&text);
            }
        }
        if tagged {
            let as_vendored = match rel.strip_prefix("staging/src/") {
                Some(rest) => format!("vendor/{rest}"),
                None => rel,
            };
            let excluded = [
                "vendor/k8s.io/code-generator/",
                "vendor/k8s.io/sample-apiserver/",
            ]
            .iter()
            .any(|p| as_vendored.starts_with(p));
            if !excluded {
                dirs.insert(as_vendored);
            }
        }
    }
    Ok(dirs)
}

/// A file counts when it has a `// +k8s:` comment tag at column 0 and mentions
/// `+k8s:openapi-gen=` (the two greps of kube's Makefile.generated_files).
fn has_openapi_tag(text: &str) -> bool {
    text.contains("+k8s:openapi-gen=")
        && text.lines().any(|l| {
            l.strip_prefix("//")
                .is_some_and(|rest| rest.trim_start_matches(' ').starts_with("+k8s:"))
        })
}

fn version_ldflags() -> String {
    let minor = KUBE_VERSION.split('.').nth(1).unwrap_or_default();
    let vars = [
        ("gitVersion", KUBE_VERSION),
        ("gitMajor", "1"),
        ("gitMinor", minor),
        ("gitTreeState", "archive"),
        // The release's own date, so the binary does not depend on when it was built.
        ("buildDate", "2021-01-13T13:20:09Z"),
    ];
    let mut flags = vec!["-s".to_string(), "-w".to_string()];
    for pkg in VERSION_PACKAGES {
        for (key, value) in vars {
            flags.push(format!("-X {pkg}.{key}={value}"));
        }
    }
    flags.join(" ")
}

/// Go 1.15 in GOPATH mode over the unpacked tree, with no network and no user config.
struct GoEnv {
    goroot: PathBuf,
    gopath: PathBuf,
    gocache: PathBuf,
    tree: PathBuf,
}

impl GoEnv {
    fn cmd(&self) -> Command {
        let mut c = Command::new(self.goroot.join("bin/go"));
        self.env(&mut c);
        c
    }

    fn env<'a>(&self, c: &'a mut Command) -> &'a mut Command {
        let path = env::var("PATH").unwrap_or_default();
        c.current_dir(&self.tree)
            .env("GOROOT", &self.goroot)
            .env("GOPATH", &self.gopath)
            .env("GOCACHE", &self.gocache)
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .env("GOPROXY", "off")
            .env("GOENV", "off")
            .env("CGO_ENABLED", "0")
            .env("PWD", &self.tree)
            .env(
                "PATH",
                format!("{}:{path}", self.goroot.join("bin").display()),
            )
    }

    /// Runs a command set up by [`GoEnv::cmd`] or [`GoEnv::env`], echoing it without the
    /// environment (GOROOT etc. are all under the scratch directory) and without the long
    /// `-i` package list of openapi-gen.
    fn run(&self, c: &mut Command) -> Result<()> {
        let program = Path::new(c.get_program())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut shown = vec![program];
        let mut args = c.get_args().map(|a| a.to_string_lossy().into_owned());
        while let Some(a) = args.next() {
            if a == "-i" {
                let n = args.next().map_or(0, |list| list.split(',').count());
                shown.push(format!("-i <{n} packages>"));
            } else if a.contains(' ') {
                shown.push(format!("'{a}'"));
            } else {
                shown.push(a);
            }
        }
        cmd::run_shown(c, &shown.join(" "))
    }
}

/// apt with its own source list, package lists and download cache, so nothing of the
/// machine's apt state changes.
struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    fn new(root: &Path, mirror: &Mirror) -> Result<Self> {
        let lists = root.join("lists");
        let cache = root.join("cache");
        let parts = root.join("sources.list.d");
        for d in [
            lists.join("partial"),
            cache.join("archives/partial"),
            parts.clone(),
        ] {
            fs::create_dir_all(&d)?;
        }
        let signed = mirror
            .signed_by
            .as_deref()
            .map(|k| format!(" [signed-by={k}]"))
            .unwrap_or_default();
        let uri = &mirror.uri;
        let list = root.join("sources.list");
        fs::write(
            &list,
            format!(
                "deb-src{signed} {uri} {SOURCE_SUITE} main\n\
                 deb{signed} {uri} {SOURCE_SUITE} main\n\
                 deb{signed} {uri} {GO_SUITE} main\n"
            ),
        )?;
        let options = vec![
            format!("Dir::Etc::SourceList={}", list.display()),
            format!("Dir::Etc::SourceParts={}", parts.display()),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", cache.display()),
            // Only the indexes we need: no translations, no AppStream metadata.
            "Acquire::Languages=none".to_string(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_string(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".to_string(),
            // Downloads land in our scratch directory, which apt's sandbox user cannot write.
            "APT::Sandbox::User=root".to_string(),
        ];
        Ok(PrivateApt { options })
    }

    fn run(&self, c: &mut Command) -> Result<()> {
        for o in &self.options {
            c.arg("-o").arg(o);
        }
        c.arg("-q").env("DEBIAN_FRONTEND", "noninteractive");
        cmd::run(c)
    }
}

/// The machine's Debian mirror: the first `deb` source serving its own release's main
/// archive (not -security or -updates).
#[derive(Debug, PartialEq, Eq)]
struct Mirror {
    uri: String,
    signed_by: Option<String>,
}

fn debian_mirror() -> Result<Mirror> {
    let codename = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| SOURCE_SUITE.to_string());
    let mut texts = Vec::new();
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push((false, t));
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let name = p.to_string_lossy();
            let deb822 = name.ends_with(".sources");
            if (deb822 || name.ends_with(".list"))
                && let Ok(t) = fs::read_to_string(&p)
            {
                texts.push((deb822, t));
            }
        }
    }
    let found = texts.iter().find_map(|(deb822, text)| {
        if *deb822 {
            mirror_in_deb822(text, &codename)
        } else {
            mirror_in_one_line(text, &codename)
        }
    });
    found.with_context(|| {
        format!("no Debian `deb` source for `{codename} main` in /etc/apt/sources.list(.d)")
    })
}

/// A deb822 `.sources` file: stanzas of `Field: value` lines.
fn mirror_in_deb822(text: &str, codename: &str) -> Option<Mirror> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let words = |name: &str| field(name).unwrap_or_default();
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        let types = words("Types");
        let suites = words("Suites");
        let components = words("Components");
        if enabled
            && types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == codename)
            && components.split_whitespace().any(|c| c == "main")
        {
            let uri = words("URIs").split_whitespace().next()?.to_string();
            return Some(Mirror {
                uri,
                signed_by: field("Signed-By").filter(|k| k.starts_with('/')),
            });
        }
    }
    None
}

/// One-line format: `deb [options] uri suite component...`.
fn mirror_in_one_line(text: &str, codename: &str) -> Option<Mirror> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("deb ")?.trim();
        let (opts, rest) = match rest.strip_prefix('[') {
            Some(r) => {
                let (o, r) = r.split_once(']')?;
                (o, r)
            }
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        let suite = words.next()?;
        (suite == codename && words.any(|c| c == "main")).then(|| Mirror {
            uri: uri.to_string(),
            signed_by: opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_string),
        })
    })
}

fn files_ending(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.exists() {
            eprintln!("removing the build directory {}…", self.0.display());
            if let Err(e) = fs::remove_dir_all(&self.0) {
                eprintln!("warning: could not remove {}: {e}", self.0.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_main_archive_in_deb822() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                    Components: main\nSigned-By: /usr/share/keyrings/k.gpg\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(
            mirror_in_deb822(text, "bookworm"),
            Some(Mirror {
                uri: "http://mirror.example/debian".into(),
                signed_by: Some("/usr/share/keyrings/k.gpg".into())
            })
        );
        assert_eq!(mirror_in_deb822(text, "trixie"), None);
    }

    #[test]
    fn finds_the_main_archive_in_one_line_lists() {
        let text = "# comment\ndeb http://sec.example/debian-security bookworm-security main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib\n";
        assert_eq!(
            mirror_in_one_line(text, "bookworm"),
            Some(Mirror {
                uri: "http://mirror.example/debian".into(),
                signed_by: Some("/k.gpg".into())
            })
        );
    }

    #[test]
    fn openapi_tags_need_a_column_zero_tag() {
        assert!(has_openapi_tag("// +k8s:openapi-gen=true\npackage v1\n"));
        assert!(has_openapi_tag(
            "// +k8s:deepcopy-gen=package\n// +k8s:openapi-gen=false\n"
        ));
        assert!(!has_openapi_tag("package v1\n"));
        assert!(!has_openapi_tag("\t// +k8s:openapi-gen=true\n"));
    }
}
