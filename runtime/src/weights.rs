//! Model weights for a manifest: from `.safetensors` files, or random.
//!
//! Every buffer of role `weight` is looked up by its name (the model's
//! Hugging Face tensor names). Checkpoints differ in prefixes, so each name
//! is also tried without a leading `transformer.` / `model.` and with one
//! added; `lm_head.weight` falls back to the token embedding when the
//! checkpoint ties them (no `lm_head.weight` stored). The stored shape must
//! equal the manifest's exactly; `f32`, `bf16` and `f16` tensors are
//! converted to `f32` [`HostTensor`]s (the backend converts to the storage
//! dtype on upload).
//!
//! A file's header is read and checked when it is opened; its tensors are
//! read from the file one at a time, when asked for, so the host holds no
//! copy of the checkpoint beside the step's weights (a 7B model's
//! checkpoint is 13.5 GB in bf16).

use crate::manifest::{Buffer, BufferKind, Manifest, ManifestError};
use crate::random::{random_tensor, random_tensor_in, shape_at};
use crate::{HostTensor, Step, StepError};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Largest header read (as the `safetensors` crate allows).
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Bytes of a tensor read at once while it is converted to f32 (a
/// multiple of every element's width).
const READ_CHUNK: usize = 1 << 22;

/// Each message says its cause; none is also given as the `source()`, so
/// an error chain (`anyhow`'s `{:#}`) words each error once.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read weights {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path} is not a valid safetensors file: {message}")]
    Format { path: String, message: String },
    #[error("no .safetensors files in {0}")]
    NoFiles(String),
    #[error("weight `{name}` is not in {files} (tried {tried})")]
    Missing { name: String, tried: String, files: String },
    #[error("weight `{name}` (stored as `{stored}` in {path}): the manifest expects shape {expected:?}, the file has {got:?}")]
    Shape { name: String, stored: String, path: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("weight `{name}` (stored as `{stored}`) has dtype {dtype}; supported: F32, BF16, F16")]
    DType { name: String, stored: String, dtype: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("binding weight `{name}`: {error}")]
    Bind { name: String, error: StepError },
}

/// One or more `.safetensors` files, their headers read and checked; each
/// tensor is read from its file when asked for.
pub struct WeightFiles {
    files: Vec<WeightFile>,
}

struct WeightFile {
    path: PathBuf,
    /// Read at a tensor's offset, one tensor at a time.
    file: Mutex<File>,
    /// Offset of the data section (8 + header length).
    data_start: u64,
    metadata: Metadata,
}

impl WeightFiles {
    /// Opens the given files; a directory stands for every `*.safetensors`
    /// file in it (sharded checkpoints), in name order.
    pub fn open(paths: &[PathBuf]) -> Result<Self, WeightsError> {
        let mut files = Vec::new();
        for path in paths {
            if path.is_dir() {
                let read_err = |error| WeightsError::Read { path: path.display().to_string(), error };
                let mut shards: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(read_err)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                    .collect();
                if shards.is_empty() {
                    return Err(WeightsError::NoFiles(path.display().to_string()));
                }
                shards.sort();
                for shard in shards {
                    files.push(WeightFile::open(&shard)?);
                }
            } else {
                files.push(WeightFile::open(path)?);
            }
        }
        Ok(WeightFiles { files })
    }

    /// Every tensor name stored, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.files.iter().flat_map(|f| f.metadata.offset_keys()).collect();
        names.sort_unstable();
        names
    }

    /// The tensor for manifest weight `name` with shape `expected`, as f32.
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<HostTensor, WeightsError> {
        self.tensor_in(name, expected, Vec::new())
    }

    /// [`WeightFiles::tensor`], its values read into `spare`'s memory
    /// where they fit (see [`crate::random::random_tensor_in`]).
    pub fn tensor_in(&self, name: &str, expected: &[usize], spare: Vec<f32>) -> Result<HostTensor, WeightsError> {
        let (file, info) = self.locate(name, expected)?;
        // `WeightFile::open` checked that the offsets lie inside the file
        // and that they hold the shape's elements; `locate`, the dtype.
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => file.read_f32(info, 4, spare, |bytes, out| {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            })?,
            Dtype::BF16 => {
                file.read_halves(info, spare, |b, out| b.reinterpret_cast::<half::bf16>().convert_to_f32_slice(out))?
            }
            _ => file.read_halves(info, spare, |b, out| b.reinterpret_cast::<half::f16>().convert_to_f32_slice(out))?,
        };
        Ok(HostTensor { shape: expected.to_vec(), data })
    }

    /// Checks, from the files' headers alone, that every weight of
    /// `manifest` is stored with its shape in a float dtype bifurc reads
    /// (f32, bf16, f16): a checkpoint that lacks one is refused before
    /// minutes of binding the others.
    pub fn check(&self, manifest: &Manifest) -> Result<(), WeightsError> {
        for buffer in weight_buffers(manifest) {
            self.locate(&buffer.name, &shape_at(manifest, buffer, &manifest.point)?)?;
        }
        Ok(())
    }

    /// The file and header entry of manifest weight `name` (under one of
    /// its [`candidate_names`]), checked to have shape `expected` and a
    /// dtype bifurc reads.
    fn locate(&self, name: &str, expected: &[usize]) -> Result<(&WeightFile, &TensorInfo), WeightsError> {
        let tried = candidate_names(name);
        let found = tried.iter().find_map(|candidate| {
            self.files.iter().find_map(|f| f.metadata.info(candidate).map(|info| (f, candidate, info)))
        });
        let Some((file, stored, info)) = found else {
            let files: Vec<String> = self.files.iter().map(|f| f.path.display().to_string()).collect();
            return Err(WeightsError::Missing {
                name: name.to_string(),
                tried: tried.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", "),
                files: files.join(", "),
            });
        };
        if info.shape != expected {
            return Err(WeightsError::Shape {
                name: name.to_string(),
                stored: stored.clone(),
                path: file.path.display().to_string(),
                expected: expected.to_vec(),
                got: info.shape.clone(),
            });
        }
        match info.dtype {
            Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok((file, info)),
            other => {
                Err(WeightsError::DType { name: name.to_string(), stored: stored.clone(), dtype: format!("{other:?}") })
            }
        }
    }
}

impl WeightFile {
    /// Opens `path` and reads its header: an 8-byte little-endian length,
    /// then that many bytes of JSON. Checks what the `safetensors` crate
    /// checks of a file it is given whole: the tensors' byte ranges follow
    /// one another from the start of the data, each holding its shape's
    /// elements, and the last ends where the file does.
    fn open(path: &Path) -> Result<Self, WeightsError> {
        let shown = || path.display().to_string();
        let read_err = |error| WeightsError::Read { path: shown(), error };
        let format = |message: String| WeightsError::Format { path: shown(), message };
        let mut file = File::open(path).map_err(read_err)?;
        let len = file.metadata().map_err(read_err)?.len();
        if len < 8 {
            return Err(format(format!("{len} bytes: too short for the 8-byte header length")));
        }
        let mut word = [0u8; 8];
        file.read_exact(&mut word).map_err(read_err)?;
        let header = u64::from_le_bytes(word);
        if header > MAX_HEADER_BYTES || header > len - 8 {
            return Err(format(format!("a header of {header} bytes, in a file of {len}")));
        }
        // At most MAX_HEADER_BYTES: fits a usize.
        let mut text = vec![0u8; header as usize];
        file.read_exact(&mut text).map_err(read_err)?;
        let metadata: Metadata =
            serde_json::from_slice(&text).map_err(|e| format(format!("its header is not valid: {e}")))?;
        // Deserializing checked that the tensors' byte ranges follow one
        // another from 0, each holding its shape's elements; the last must
        // end where the file does.
        let data_start = 8 + header;
        let end = metadata.offset_keys().last().and_then(|name| metadata.info(name)).map_or(0, |i| i.data_offsets.1);
        if end as u64 != len - data_start {
            return Err(format(format!(
                "its tensors take {end} bytes after the header, and the file holds {}",
                len - data_start
            )));
        }
        Ok(WeightFile { path: path.to_path_buf(), file: Mutex::new(file), data_start, metadata })
    }

    /// The half-precision tensor at `info` as f32: each chunk's
    /// little-endian 16-bit words converted by `to_f32`, the `half`
    /// crate's slice conversion (F16C vectors for f16 where the CPU has
    /// them: Llama-2-7B's first 2 layers in f16 bound in 4.1-5.1 -> 2.5-2.8
    /// s, against one value at a time).
    fn read_halves(
        &self,
        info: &TensorInfo,
        spare: Vec<f32>,
        to_f32: impl Fn(&[u16], &mut [f32]),
    ) -> Result<Vec<f32>, WeightsError> {
        let mut bits = Vec::new();
        self.read_f32(info, 2, spare, |bytes, out| {
            bits.clear();
            bits.extend(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
            to_f32(&bits, out);
        })
    }

    /// The elements of the tensor at `info` (of `width` bytes each) as
    /// f32 in `spare`'s memory where they fit, read from the file a chunk
    /// at a time, each chunk's bytes converted into its elements by
    /// `convert`.
    fn read_f32(
        &self,
        info: &TensorInfo,
        width: usize,
        spare: Vec<f32>,
        mut convert: impl FnMut(&[u8], &mut [f32]),
    ) -> Result<Vec<f32>, WeightsError> {
        let read_err = |error| WeightsError::Read { path: self.path.display().to_string(), error };
        let (start, end) = info.data_offsets;
        let mut left = end - start;
        // Every element is converted below.
        let mut out = crate::random::sized(spare, left / width);
        let mut at = 0;
        let mut chunk = vec![0u8; left.min(READ_CHUNK)];
        // A read that panicked part way left nothing but the file's
        // position behind, and every read seeks first.
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        file.seek(SeekFrom::Start(self.data_start + start as u64)).map_err(read_err)?;
        while left > 0 {
            let n = left.min(READ_CHUNK);
            file.read_exact(&mut chunk[..n]).map_err(read_err)?;
            convert(&chunk[..n], &mut out[at..at + n / width]);
            at += n / width;
            left -= n;
        }
        Ok(out)
    }
}

/// The names tried for manifest weight `name`, in order: itself, without a
/// leading `transformer.` / `model.`, with each added, and for
/// `lm_head.weight` the tied token embeddings.
pub fn candidate_names(name: &str) -> Vec<String> {
    const PREFIXES: [&str; 2] = ["transformer.", "model."];
    let mut out = vec![name.to_string()];
    let bare = PREFIXES.iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name);
    let mut push = |n: String| {
        if !out.contains(&n) {
            out.push(n);
        }
    };
    push(bare.to_string());
    for p in PREFIXES {
        push(format!("{p}{bare}"));
    }
    if bare == "lm_head.weight" {
        for tied in ["model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight", "wte.weight"] {
            push(tied.to_string());
        }
    }
    out
}

/// The manifest's weight buffers, in table order.
pub fn weight_buffers(manifest: &Manifest) -> impl Iterator<Item = &Buffer> {
    manifest.buffers.iter().filter(|b| b.kind == BufferKind::Input && b.role.as_deref() == Some("weight"))
}

/// Bytes of `manifest`'s largest weight in f32: what binding its weights
/// holds beside the step's own copies, at most ([`bind_weights`] reads and
/// converts one weight at a time, [`bind_random_weights`] draws one).
pub fn binding_bytes(manifest: &Manifest) -> Result<usize, WeightsError> {
    let mut most = 0usize;
    for buffer in weight_buffers(manifest) {
        let n = shape_at(manifest, buffer, &manifest.point)?.iter().fold(1usize, |n, &d| n.saturating_mul(d));
        most = most.max(n.saturating_mul(4));
    }
    Ok(most)
}

/// Every weight of `manifest` from `files`, checked against the manifest's shapes.
pub fn load_weights(manifest: &Manifest, files: &WeightFiles) -> Result<HashMap<String, HostTensor>, WeightsError> {
    let mut out = HashMap::new();
    for buffer in weight_buffers(manifest) {
        let shape = shape_at(manifest, buffer, &manifest.point)?;
        out.insert(buffer.name.clone(), files.tensor(&buffer.name, &shape)?);
    }
    Ok(out)
}

/// Binds every weight of `manifest` from `files` to `step`, one tensor at a
/// time (host memory holds one tensor, converted to f32). Returns the
/// number bound; `progress` sees each name before it is bound.
pub fn bind_weights<S: Step + ?Sized>(
    step: &mut S,
    manifest: &Manifest,
    files: &WeightFiles,
    progress: impl FnMut(&str),
) -> Result<usize, WeightsError> {
    bind_files(step, manifest, files, |_| true, progress)
}

/// [`bind_weights`] of the weights named by `which` alone.
fn bind_files<S: Step + ?Sized>(
    step: &mut S,
    manifest: &Manifest,
    files: &WeightFiles,
    which: impl Fn(&str) -> bool,
    progress: impl FnMut(&str),
) -> Result<usize, WeightsError> {
    bind_each(step, manifest, which, progress, |buffer, spare| {
        files.tensor_in(&buffer.name, &shape_at(manifest, buffer, &manifest.point)?, spare)
    })
}

/// Binds the weights of `manifest` named by `which` to `step` in table
/// order, each made by `make` (given the last one's memory to reuse) and
/// told to `progress` before it is bound; returns the number bound.
fn bind_each<S: Step + ?Sized>(
    step: &mut S,
    manifest: &Manifest,
    which: impl Fn(&str) -> bool,
    mut progress: impl FnMut(&str),
    mut make: impl FnMut(&Buffer, Vec<f32>) -> Result<HostTensor, WeightsError>,
) -> Result<usize, WeightsError> {
    let (mut count, mut spare) = (0, Vec::new());
    for buffer in weight_buffers(manifest).filter(|b| which(&b.name)) {
        progress(&buffer.name);
        let tensor = make(buffer, std::mem::take(&mut spare))?;
        step.bind(&buffer.name, &tensor).map_err(|error| WeightsError::Bind { name: buffer.name.clone(), error })?;
        spare = tensor.data;
        count += 1;
    }
    Ok(count)
}

/// Deterministic random weights for every weight buffer (see
/// [`crate::random`] for the scheme; the interpreter's, for the same seed).
pub fn random_weights(manifest: &Manifest, seed: u64) -> Result<HashMap<String, HostTensor>, WeightsError> {
    let mut out = HashMap::new();
    for buffer in weight_buffers(manifest) {
        out.insert(buffer.name.clone(), random_tensor(manifest, buffer, &manifest.point, seed)?);
    }
    Ok(out)
}

/// Binds deterministic random weights to `step`, one tensor at a time.
pub fn bind_random_weights<S: Step + ?Sized>(
    step: &mut S,
    manifest: &Manifest,
    seed: u64,
) -> Result<usize, WeightsError> {
    bind_random_with(step, manifest, seed, |_| true, |_| {})
}

/// [`bind_random_weights`], telling `progress` each name before it is bound.
fn bind_random_with<S: Step + ?Sized>(
    step: &mut S,
    manifest: &Manifest,
    seed: u64,
    which: impl Fn(&str) -> bool,
    progress: impl FnMut(&str),
) -> Result<usize, WeightsError> {
    bind_each(step, manifest, which, progress, |buffer, spare| {
        Ok(random_tensor_in(manifest, buffer, &manifest.point, seed, spare)?)
    })
}

/// Where a run's weights come from: checkpoint files (read once, bound into
/// as many steps as need them: a decode step and its prefill step) or a
/// seed.
pub enum WeightSource {
    Random(u64),
    Files(WeightFiles),
}

impl WeightSource {
    /// Binds every weight of `manifest` to `step` ([`bind_random_weights`]
    /// or [`bind_weights`]); returns the number bound.
    pub fn bind<S: Step + ?Sized>(&self, step: &mut S, manifest: &Manifest) -> Result<usize, WeightsError> {
        self.bind_with(step, manifest, |_| {})
    }

    /// [`WeightSource::bind`], telling `progress` each weight's name before
    /// it is bound (a 7B model's 291 take half a minute or more).
    pub fn bind_with<S: Step + ?Sized>(
        &self,
        step: &mut S,
        manifest: &Manifest,
        progress: impl FnMut(&str),
    ) -> Result<usize, WeightsError> {
        self.bind_where(step, manifest, |_| true, progress)
    }

    /// Checks that every weight of `manifest` can be bound from this
    /// source before any is ([`WeightFiles::check`]; random weights always
    /// can).
    pub fn check(&self, manifest: &Manifest) -> Result<(), WeightsError> {
        match self {
            WeightSource::Random(_) => Ok(()),
            WeightSource::Files(files) => files.check(manifest),
        }
    }

    /// [`WeightSource::bind_with`] of the weights named by `which` alone
    /// (those a step does not already share with another): each has the
    /// values it has among all of them (random ones are drawn by name).
    pub fn bind_where<S: Step + ?Sized>(
        &self,
        step: &mut S,
        manifest: &Manifest,
        which: impl Fn(&str) -> bool,
        progress: impl FnMut(&str),
    ) -> Result<usize, WeightsError> {
        match self {
            WeightSource::Random(seed) => bind_random_with(step, manifest, *seed, which, progress),
            WeightSource::Files(files) => bind_files(step, manifest, files, which, progress),
        }
    }
}
