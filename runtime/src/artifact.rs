//! An artifact on disk: `step.ptx` and the manifest beside it
//! (`step.manifest.json`), read and cross-checked before any device work.
//!
//! The naming rule is the compiler's (`bifurc::lower::Artifact::manifest_path`):
//! `dir/<stem>.ptx` → `dir/<stem>.manifest.json`.

use crate::manifest::{Manifest, ManifestError};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A loaded artifact: the PTX text and its manifest.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub ptx_path: PathBuf,
    pub manifest_path: PathBuf,
    /// The PTX module (text, no NUL bytes).
    pub ptx: String,
    pub manifest: Manifest,
}

/// Each message says its cause; none is also given as the `source()`, so
/// an error chain (`anyhow`'s `{:#}`) words each error once.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("cannot read {what} {path}: {error}")]
    Read { what: &'static str, path: String, error: std::io::Error },
    #[error("manifest {path}: {error}")]
    Manifest { path: String, error: ManifestError },
    #[error("PTX {path}: {message}")]
    Ptx { path: String, message: String },
}

impl Artifact {
    /// Where the compiler writes the manifest of a PTX file:
    /// `dir/step.ptx` → `dir/step.manifest.json`.
    pub fn manifest_path(ptx_path: &Path) -> PathBuf {
        let stem = ptx_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "step".into());
        ptx_path.with_file_name(format!("{stem}.manifest.json"))
    }

    /// Loads an artifact from its PTX path (the manifest is found beside it),
    /// or from its manifest path (`*.manifest.json`; the PTX is the file its
    /// `ptx` field names, in the same directory). Checks that the manifest is
    /// valid and that every kernel entry it names is an `.entry` of the PTX.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ArtifactError> {
        let path = path.as_ref();
        let is_manifest = path.to_string_lossy().ends_with(".manifest.json");
        let (ptx_path, manifest_path, manifest) = if is_manifest {
            let manifest = load_manifest(path)?;
            (path.with_file_name(&manifest.ptx), path.to_path_buf(), manifest)
        } else {
            let manifest_path = Self::manifest_path(path);
            if !path.exists() {
                return Err(ArtifactError::Read {
                    what: "PTX",
                    path: path.display().to_string(),
                    error: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                });
            }
            let manifest = load_manifest(&manifest_path)?;
            (path.to_path_buf(), manifest_path, manifest)
        };
        let ptx = std::fs::read_to_string(&ptx_path).map_err(|error| ArtifactError::Read {
            what: "PTX",
            path: ptx_path.display().to_string(),
            error,
        })?;
        let artifact = Artifact { ptx_path, manifest_path, ptx, manifest };
        artifact.check()?;
        Ok(artifact)
    }

    /// An artifact from text already in memory (tests, engines that embed it).
    pub fn from_parts(ptx: String, manifest: Manifest) -> Result<Self, ArtifactError> {
        let artifact = Artifact {
            ptx_path: PathBuf::from(&manifest.ptx),
            manifest_path: Self::manifest_path(Path::new(&manifest.ptx)),
            ptx,
            manifest,
        };
        artifact.check()?;
        Ok(artifact)
    }

    /// The distinct PTX entries the kernels launch, in first-use order.
    pub fn entries(&self) -> Vec<&str> {
        let mut seen = BTreeSet::new();
        self.manifest.kernels.iter().map(|k| k.entry.as_str()).filter(|e| seen.insert(*e)).collect()
    }

    fn check(&self) -> Result<(), ArtifactError> {
        let ptx_err = |message: String| ArtifactError::Ptx { path: self.ptx_path.display().to_string(), message };
        if self.ptx.contains('\0') {
            return Err(ptx_err("contains a NUL byte; not a PTX text module".into()));
        }
        let defined = ptx_entries(&self.ptx);
        if defined.is_empty() && !self.manifest.kernels.is_empty() {
            return Err(ptx_err("defines no `.entry` (is this a PTX file?)".into()));
        }
        if let Some(missing) = self.entries().into_iter().find(|e| !defined.contains(*e)) {
            return Err(ptx_err(format!(
                "has no `.entry {missing}`, which manifest {} names (PTX and manifest from different compiles?)",
                self.manifest_path.display()
            )));
        }
        // The ABI: every parameter is 64 bits, one per manifest param.
        let params = ptx_entry_params(&self.ptx);
        let wide = ptx_entries_with_narrow_params(&self.ptx);
        for kernel in &self.manifest.kernels {
            let count = params.get(&kernel.entry).copied().unwrap_or(0);
            if count != kernel.params.len() {
                return Err(ptx_err(format!(
                    "`.entry {}` takes {count} parameters but manifest kernel `{}` passes {}",
                    kernel.entry,
                    kernel.name,
                    kernel.params.len()
                )));
            }
            if wide.contains(&kernel.entry) {
                return Err(ptx_err(format!(
                    "`.entry {}` has a parameter that is not 64-bit (the kernel ABI passes i64 dims and pointers)",
                    kernel.entry
                )));
            }
        }
        Ok(())
    }
}

fn load_manifest(path: &Path) -> Result<Manifest, ArtifactError> {
    if !path.exists() {
        return Err(ArtifactError::Read {
            what: "manifest",
            path: path.display().to_string(),
            error: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file (`bifurc compile -o step.ptx` writes step.manifest.json beside step.ptx)",
            ),
        });
    }
    Manifest::load(path).map_err(|error| ArtifactError::Manifest { path: path.display().to_string(), error })
}

/// Names of the `.entry` functions a PTX module defines.
pub fn ptx_entries(ptx: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in ptx.lines() {
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            if word == ".entry" {
                if let Some(next) = words.next() {
                    let name: String =
                        next.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '$').collect();
                    if !name.is_empty() {
                        out.insert(name);
                    }
                }
                break;
            }
        }
    }
    out
}

/// The `.param` declarations of each `.entry` (from its name to the closing
/// parenthesis), as (entry, parameter types).
fn ptx_entry_param_types(ptx: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = ptx;
    while let Some(at) = rest.find(".entry") {
        let after = &rest[at + ".entry".len()..];
        let name: String =
            after.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '$').collect();
        let open = after.find('(');
        let close = after.find(')');
        let (Some(open), Some(close)) = (open, close) else { break };
        if name.is_empty() || close < open {
            rest = after;
            continue;
        }
        let types = after[open + 1..close]
            .split(',')
            .filter_map(|p| {
                let mut words = p.split_whitespace();
                (words.next() == Some(".param")).then(|| words.next().unwrap_or("").to_string())
            })
            .collect();
        out.push((name, types));
        rest = &after[close..];
    }
    out
}

/// The number of parameters of each `.entry` of a PTX module.
pub fn ptx_entry_params(ptx: &str) -> BTreeMap<String, usize> {
    ptx_entry_param_types(ptx).into_iter().map(|(name, types)| (name, types.len())).collect()
}

/// Entries with a parameter that is not 64-bit.
fn ptx_entries_with_narrow_params(ptx: &str) -> BTreeSet<String> {
    ptx_entry_param_types(ptx)
        .into_iter()
        .filter(|(_, types)| types.iter().any(|t| !matches!(t.as_str(), ".u64" | ".b64" | ".s64")))
        .map(|(name, _)| name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/step.ptx")
    }

    /// An error's chain, as `anyhow`'s `{:#}` prints it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut next = e.source();
        while let Some(s) = next {
            text = format!("{text}: {s}");
            next = s.source();
        }
        text
    }

    /// Read, JSON and manifest errors say their cause once, in the chain
    /// as in the message (they said it twice, the message and the source).
    #[test]
    fn errors_word_their_cause_once() {
        let dir = std::env::temp_dir().join(format!("bifurc-artifact-errors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = Artifact::load(dir.join("none.ptx")).unwrap_err();
        let bad = dir.join("bad.manifest.json");
        std::fs::write(&bad, "{").unwrap();
        std::fs::write(dir.join("bad.ptx"), "").unwrap();
        let json = Artifact::load(dir.join("bad.ptx")).unwrap_err();
        let read = Manifest::load(dir.join("none.manifest.json")).unwrap_err();
        let parse = Manifest::load(&bad).unwrap_err();
        for (e, cause) in [
            (&missing as &dyn std::error::Error, "no such file"),
            (&json, "EOF while parsing"),
            (&read, "No such file"),
            (&parse, "EOF while parsing"),
        ] {
            let text = chain(e);
            assert_eq!(text, e.to_string(), "no source beside the message");
            assert_eq!(text.matches(cause).count(), 1, "{text}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn loads_the_fixture_by_either_path() {
        let a = Artifact::load(fixture()).unwrap();
        assert_eq!(a.manifest_path.file_name().unwrap(), "step.manifest.json");
        assert!(a.entries().len() < a.manifest.kernels.len(), "kernels share entries");
        let b = Artifact::load(&a.manifest_path).unwrap();
        assert_eq!(b.ptx_path, a.ptx_path);
        assert_eq!(b.ptx, a.ptx);
    }

    #[test]
    fn reads_entry_parameters() {
        let ptx =
            ".visible .entry k0_a(\n\t.param .u64 k0_a_param_0,\n\t.param .u64 .ptr .align 1 k0_a_param_1\n)\n{\n}\n\
                   .visible .entry k1_b()\n{\n}\n.entry k2_c(.param .u32 x)";
        let p = ptx_entry_params(ptx);
        assert_eq!(p["k0_a"], 2);
        assert_eq!(p["k1_b"], 0);
        assert_eq!(ptx_entries_with_narrow_params(ptx), BTreeSet::from(["k2_c".to_string()]));
        let a = Artifact::load(fixture()).unwrap();
        let p = ptx_entry_params(&a.ptx);
        for k in &a.manifest.kernels {
            assert_eq!(p[&k.entry], k.params.len(), "{}", k.name);
        }
    }

    #[test]
    fn finds_entries() {
        let ptx = ".visible .entry k0_a(\n .param .u64 x\n)\n// .entry not_this\n.entry  k1_b (";
        let e = ptx_entries(ptx);
        assert!(e.contains("k0_a") && e.contains("k1_b"), "{e:?}");
    }

    #[test]
    fn clear_errors() {
        let dir = std::env::temp_dir().join(format!("bifurc-artifact-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = Artifact::load(dir.join("none.ptx")).unwrap_err().to_string();
        assert!(err.contains("none.ptx"), "{err}");

        // PTX present, manifest missing: the error names the manifest path.
        std::fs::write(dir.join("lone.ptx"), ".visible .entry k0_x()").unwrap();
        let err = Artifact::load(dir.join("lone.ptx")).unwrap_err().to_string();
        assert!(err.contains("lone.manifest.json"), "{err}");

        // A PTX that lacks an entry the manifest names.
        let a = Artifact::load(fixture()).unwrap();
        let entry = a.entries()[0].to_string();
        let ptx = a.ptx.replace(&format!(".entry {entry}("), ".entry renamed(");
        let err = Artifact::from_parts(ptx, a.manifest.clone()).unwrap_err().to_string();
        assert!(err.contains(&entry), "{err}");

        let mut m = a.manifest.clone();
        let p = m.kernels[0].params.pop().unwrap();
        let err = Artifact::from_parts(a.ptx.clone(), m).unwrap_err().to_string();
        assert!(err.contains(&format!("passes {}", a.manifest.kernels[0].params.len() - 1)), "{err} ({p:?})");

        let err = Artifact::from_parts("x\0y".into(), a.manifest).unwrap_err().to_string();
        assert!(err.contains("NUL"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
