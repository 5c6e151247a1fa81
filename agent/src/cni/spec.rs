//! What the CNI specification fixes: versions, commands, error codes and the error object.
use std::fmt;

use serde::Serialize;

/// The newest version we speak: what VERSION and errors answer with when the caller's version
/// is unknown.
pub const LATEST: Version = Version::V1_1_0;

/// Spec versions with chaining (prevResult). 0.3.x is here because many primary CNIs still
/// ship 0.3.1 conflists, and the installer chains into whatever the node has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub const ALL: [Version; 5] = [
        Version::V0_3_0,
        Version::V0_3_1,
        Version::V0_4_0,
        Version::V1_0_0,
        Version::V1_1_0,
    ];

    pub fn parse(s: &str) -> Option<Version> {
        Version::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// Results before 1.0.0 carry a `version` ("4"/"6") on each IP.
    pub fn ips_have_version(self) -> bool {
        self < Version::V1_0_0
    }

    /// Whether `command` exists in this version (CHECK since 0.4.0, STATUS and GC since 1.1.0).
    pub fn allows(self, command: Command) -> bool {
        match command {
            Command::Add | Command::Del | Command::Version => true,
            Command::Check => self >= Version::V0_4_0,
            Command::Status | Command::Gc => self >= Version::V1_1_0,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

/// Error codes from the spec ("Error" section); 1-99 are reserved for it.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables (CNI_COMMAND, CNI_CONTAINERID, ...).
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (stdin is not JSON, ...).
    pub const DECODE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: a transient condition (here: the agent is down or busy).
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests.
    pub const NOT_AVAILABLE: u32 = 50;
}

/// The spec's error object; printed on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// `{"cniVersion", "code", "msg", "details"}` for a caller speaking `version`.
    pub fn to_json(&self, version: Version) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version: version.as_str(),
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| format!(r#"{{"code":{},"msg":"unencodable error"}}"#, self.code))
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_round_trip_and_order() {
        for v in Version::ALL {
            assert_eq!(Version::parse(v.as_str()), Some(v));
        }
        assert_eq!(Version::parse("0.2.0"), None);
        assert!(Version::V0_3_1 < Version::V1_0_0);
        assert!(!Version::V0_3_1.allows(Command::Check));
        assert!(Version::V0_4_0.allows(Command::Check));
        assert!(!Version::V1_0_0.allows(Command::Gc));
        assert!(Version::V1_1_0.allows(Command::Status));
    }

    #[test]
    fn error_object_has_the_spec_fields() {
        let e = CniError::new(code::TRY_AGAIN, "agent down").with_details("connect: ENOENT");
        let v: serde_json::Value = serde_json::from_str(&e.to_json(Version::V1_0_0)).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "agent down");
        assert_eq!(v["details"], "connect: ENOENT");
        let bare: serde_json::Value =
            serde_json::from_str(&CniError::new(4, "x").to_json(LATEST)).unwrap();
        assert!(bare.get("details").is_none());
    }
}
