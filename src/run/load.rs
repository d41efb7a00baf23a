//! What `bifurc run` reads before it runs: token ids, the artifact, and
//! the compiled graph beside it, checked against each other, and the CPU
//! step JIT-compiled from them.

use super::{fail, RunError};
use crate::cpu_backend::CpuBackend;
use bifurc_runtime::manifest::{BufferKind, Manifest};
use bifurc_runtime::session::DecodeLayout;
use bifurc_runtime::{Artifact, SessionError};
use std::collections::BTreeMap;
use std::path::Path;

/// Parses token ids written as `1,2,3` (commas and/or whitespace; a
/// surrounding `[...]` is allowed, so a JSON array works too).
pub fn parse_ids(text: &str) -> Result<Vec<u32>, RunError> {
    let body = text.trim();
    let body = body.strip_prefix('[').and_then(|b| b.strip_suffix(']')).unwrap_or(body);
    let mut ids = Vec::new();
    for (i, item) in body.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()).enumerate() {
        let id = item
            .parse::<u32>()
            .map_err(|_| fail(format!("token id #{} `{item}` is not a non-negative integer", i + 1)))?;
        ids.push(id);
    }
    if ids.is_empty() {
        return Err(fail("no token ids given (the prompt is empty)"));
    }
    Ok(ids)
}

/// Reads token ids from a file (see [`parse_ids`]).
pub fn read_ids(path: &Path) -> Result<Vec<u32>, RunError> {
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    parse_ids(&text).map_err(|e| fail(format!("{}: {e}", path.display())))
}

/// Loads the artifact at `path` (its PTX or its manifest) and checks that
/// the session can drive it (a single-level b / m_c / m_d decode step).
pub fn load_artifact(path: &Path) -> Result<(Artifact, DecodeLayout), RunError> {
    let artifact = Artifact::load(path).map_err(|e| fail(e.to_string()))?;
    let layout = DecodeLayout::from_manifest(&artifact.manifest).map_err(|e| {
        let why = match e {
            SessionError::Layout(why) => why,
            other => other.to_string(),
        };
        fail(format!("{}: `bifurc run` cannot drive this artifact: {why}", artifact.manifest_path.display()))
    })?;
    Ok((artifact, layout))
}

/// The compiled graph beside `artifact`'s PTX (`<stem>.graph.json`),
/// imported and checked against the manifest.
pub fn load_graph(artifact: &Artifact) -> Result<crate::ir::Graph, RunError> {
    let path = crate::Artifact::graph_path(&artifact.ptx_path);
    if !path.is_file() {
        return Err(fail(format!(
            "{} is missing: the CPU device runs the compiled graph that `bifurc compile` writes beside the PTX \
             (recompile the artifact with this version of bifurc)",
            path.display()
        )));
    }
    let graph = crate::import::load(&path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    check_graph(&graph, &artifact.manifest).map_err(|e| {
        fail(format!(
            "{} does not match {}: {e} (files from different compiles?)",
            path.display(),
            artifact.manifest_path.display()
        ))
    })?;
    Ok(graph)
}

/// The graph has the manifest's runtime dims, constants, and every input
/// and output buffer by name with the same shape (at the manifest's point).
fn check_graph(graph: &crate::ir::Graph, manifest: &Manifest) -> Result<(), String> {
    if graph.dims.runtime != manifest.dims.runtime {
        return Err(format!("runtime dims {:?} vs {:?}", graph.dims.runtime, manifest.dims.runtime));
    }
    let constants: BTreeMap<String, i64> = graph.dims.constants.iter().cloned().collect();
    if constants != manifest.dims.constants {
        return Err("the model constants differ".into());
    }
    let point = &manifest.point;
    for buffer in &manifest.buffers {
        let shape = match buffer.kind {
            BufferKind::Input => graph.inputs.iter().find(|i| i.name == buffer.name).map(|i| &i.shape),
            BufferKind::Output => graph.outputs.iter().find(|o| o.name == buffer.name).map(|o| graph.shape_of(o.value)),
            BufferKind::Intermediate => continue,
        };
        let what = if buffer.kind == BufferKind::Input { "input" } else { "output" };
        let shape = shape.ok_or_else(|| format!("the graph has no {what} `{}`", buffer.name))?;
        let graph_shape: Vec<i64> =
            shape.iter().map(|p| graph.dims.eval(p, point)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        let manifest_shape: Vec<i64> = buffer
            .shape
            .iter()
            .map(|s| manifest.eval(s, point))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        if graph_shape != manifest_shape {
            return Err(format!("{what} `{}` has shape {graph_shape:?} vs {manifest_shape:?}", buffer.name));
        }
    }
    Ok(())
}

/// `artifact`'s graph ([`load_graph`]) JIT-compiled for this CPU.
pub fn jit(artifact: &Artifact) -> Result<CpuBackend, RunError> {
    let graph = load_graph(artifact)?;
    CpuBackend::compile(&graph)
        .map_err(|e| fail(format!("JIT-compiling {}: {e}", crate::Artifact::graph_path(&artifact.ptx_path).display())))
}

/// The CPU step of the artifact at `path` (its PTX or manifest), checked as
/// [`load_artifact`] and [`load_graph`] do.
pub fn cpu_step(path: &Path) -> Result<(Artifact, CpuBackend), RunError> {
    let (artifact, _) = load_artifact(path)?;
    let step = jit(&artifact)?;
    Ok((artifact, step))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_in_every_spelling() {
        assert_eq!(parse_ids("1,2,3").unwrap(), [1, 2, 3]);
        assert_eq!(parse_ids(" 1, 2 ,3\n").unwrap(), [1, 2, 3]);
        assert_eq!(parse_ids("[4, 5]").unwrap(), [4, 5]);
        assert_eq!(parse_ids("7 8\t9").unwrap(), [7, 8, 9]);
        assert!(parse_ids("").unwrap_err().to_string().contains("empty"));
        assert!(parse_ids("1,x").unwrap_err().to_string().contains("#2 `x`"));
        assert!(parse_ids("-1").is_err());
        assert!(parse_ids("4294967296").is_err());
    }
}
