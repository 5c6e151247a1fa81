//! Derives the private apt sources the VM suite fetches from, from the host's own apt
//! sources: the mirror that serves the host's Debian release also serves bookworm and
//! bookworm-backports, and its security mirror serves bookworm-security. Nothing names a
//! mirror in the repository; the URIs come from the machine at run time.
use std::{fs, path::Path};

use anyhow::{Context, Result, bail};

/// The Debian release whose kernels the VM suite boots (6.1 in it, 6.12 in its backports).
pub const RELEASE: &str = "bookworm";

/// One `deb` source of the host: where, which suites, and its `Signed-By` value verbatim
/// (a keyring path, or an inline key as deb822 continuation lines).
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub uri: String,
    pub suites: Vec<String>,
    pub signed_by: Option<String>,
}

/// The private sources file (deb822), derived from the host's `/etc/apt` sources.
pub fn derive_from_host() -> Result<String> {
    let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let codename = os_release_field(&os_release, "VERSION_CODENAME")
        .context("/etc/os-release names no VERSION_CODENAME: is this Debian?")?;
    let sources = host_sources()?;
    let text = render(&codename, &sources);
    if text.is_empty() {
        bail!(
            "no enabled `deb` source in /etc/apt serves {codename} or {codename}-security, \
             so there is no mirror to fetch {RELEASE}'s kernels from"
        );
    }
    Ok(text)
}

fn os_release_field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// Every enabled `deb` source in `/etc/apt/sources.list` and `/etc/apt/sources.list.d/`.
fn host_sources() -> Result<Vec<Source>> {
    let mut files = vec![Path::new("/etc/apt/sources.list").to_path_buf()];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<_> = dir.filter_map(|e| Some(e.ok()?.path())).collect();
        parts.sort();
        files.extend(parts);
    }
    let mut sources = Vec::new();
    for file in files {
        let name = file.to_string_lossy();
        // apt itself reads only these two extensions (others are disabled copies).
        let parse: fn(&str) -> Vec<Source> = if name.ends_with(".sources") {
            parse_deb822
        } else if name.ends_with(".list") {
            parse_one_line
        } else {
            continue;
        };
        if let Ok(text) = fs::read_to_string(&file) {
            sources.extend(parse(&text));
        }
    }
    Ok(sources)
}

/// One-line format: `deb [signed-by=/path ...] URI SUITE COMPONENT...`.
pub fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_string);
            rest = after.trim_start();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(Source {
            uri: uri.to_string(),
            suites: vec![suite.to_string()],
            signed_by,
        });
    }
    out
}

/// deb822 format: paragraphs of `Field: value`, continuation lines indented.
pub fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for paragraph in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in paragraph.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some((_, value)) = fields.last_mut() {
                    value.push('\n');
                    value.push_str(line);
                }
            } else if let Some((key, value)) = line.split_once(':') {
                fields.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
            }
        }
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let is_deb = get("types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let enabled = get("enabled").is_none_or(|e| !e.eq_ignore_ascii_case("no"));
        if !is_deb || !enabled {
            continue;
        }
        let suites: Vec<String> = get("suites")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        for uri in get("uris").unwrap_or_default().split_whitespace() {
            out.push(Source {
                uri: uri.to_string(),
                suites: suites.clone(),
                signed_by: get("signed-by").map(str::to_string),
            });
        }
    }
    out
}

/// The private deb822 sources: for each host mirror serving `codename`, bookworm and
/// bookworm-backports; for each serving `codename-security`, bookworm-security. Only `main`.
pub fn render(codename: &str, sources: &[Source]) -> String {
    let security = format!("{codename}-security");
    let mut seen: Vec<(String, &str)> = Vec::new();
    let mut text = String::new();
    for source in sources {
        let suites: &[&str] = if source.suites.iter().any(|s| *s == codename) {
            &["", "-backports"]
        } else if source.suites.contains(&security) {
            &["-security"]
        } else {
            continue;
        };
        let suites: Vec<String> = suites
            .iter()
            .filter(|s| {
                let key = (source.uri.clone(), **s);
                let new = !seen.contains(&key);
                seen.push(key);
                new
            })
            .map(|s| format!("{RELEASE}{s}"))
            .collect();
        if suites.is_empty() {
            continue;
        }
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&format!(
            "Types: deb\nURIs: {}\nSuites: {}\nComponents: main\n",
            source.uri,
            suites.join(" ")
        ));
        if let Some(key) = &source.signed_by {
            // An inline key starts on the next line.
            let sep = if key.starts_with('\n') { "" } else { " " };
            text.push_str(&format!("Signed-By:{sep}{key}\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

    #[test]
    fn deb822_keeps_enabled_deb_paragraphs() {
        let text = format!(
            "Types: deb deb-src\nURIs: http://mirror.example/debian\nSuites: trixie trixie-updates\n\
             Components: main\nSigned-By: {KEYRING}\n\n\
             Types: deb\nURIs: http://mirror.example/off\nSuites: trixie\nEnabled: no\n\n\
             Types: deb-src\nURIs: http://mirror.example/src\nSuites: trixie\n"
        );
        let sources = parse_deb822(&text);
        assert_eq!(
            sources,
            vec![Source {
                uri: "http://mirror.example/debian".into(),
                suites: vec!["trixie".into(), "trixie-updates".into()],
                signed_by: Some(KEYRING.into()),
            }]
        );
    }

    #[test]
    fn deb822_keeps_an_inline_key_verbatim() {
        let text = "Types: deb\nURIs: http://m.example/d\nSuites: trixie\n\
                    Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n";
        let sources = parse_deb822(text);
        let rendered = render("trixie", &sources);
        assert!(
            rendered.ends_with("Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n"),
            "{rendered}"
        );
    }

    #[test]
    fn one_line_reads_options_and_skips_comments() {
        let text = format!(
            "# deb http://old.example/debian bookworm main\n\
             deb [arch=amd64 signed-by={KEYRING}] http://mirror.example/debian bookworm main\n\
             deb-src http://mirror.example/debian bookworm main\n\
             deb http://sec.example/debian-security bookworm-security main # trailing\n"
        );
        let sources = parse_one_line(&text);
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].signed_by.as_deref(), Some(KEYRING));
        assert_eq!(sources[1].uri, "http://sec.example/debian-security");
        assert_eq!(sources[1].suites, ["bookworm-security"]);
    }

    #[test]
    fn render_maps_the_host_release_to_bookworm_once_per_mirror() {
        let src = |uri: &str, suite: &str| Source {
            uri: uri.into(),
            suites: vec![suite.into()],
            signed_by: None,
        };
        let sources = [
            src("http://m.example/debian", "trixie"),
            src("http://m.example/debian", "trixie-updates"),
            src("http://m.example/debian", "trixie"),
            src("http://s.example/debian-security", "trixie-security"),
            src("http://other.example/x", "nodistro"),
        ];
        assert_eq!(
            render("trixie", &sources),
            "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm bookworm-backports\n\
             Components: main\n\n\
             Types: deb\nURIs: http://s.example/debian-security\nSuites: bookworm-security\n\
             Components: main\n"
        );
    }

    #[test]
    fn os_release_codename() {
        let text = "NAME=\"Debian GNU/Linux\"\nVERSION_CODENAME=bookworm\nID=debian\n";
        assert_eq!(
            os_release_field(text, "VERSION_CODENAME").as_deref(),
            Some("bookworm")
        );
        assert_eq!(os_release_field("ID=debian\n", "VERSION_CODENAME"), None);
    }
}
