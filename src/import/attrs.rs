//! Per-op attributes: `attrs` of a node → [`Op`].

use super::json::{err, Child};
use super::{read_shape, read_size, ImportError};
use crate::ir::op::OP_NAMES;
use crate::ir::{BinaryOp, Dims, EinsumSpec, Op, ReduceOp, UnaryOp};

/// Attributes of one node, with the keys each op allows.
struct Attrs<'a, 'b> {
    at: Option<&'b Child<'a>>,
    node_path: &'b str,
}

impl<'a, 'b> Attrs<'a, 'b> {
    fn allow(&self, keys: &[&str]) -> Result<(), ImportError> {
        match self.at {
            Some(a) if keys.is_empty() => {
                if let Some(k) = a.at().object()?.keys().next() {
                    return Err(err(&a.path, format!("unknown attribute `{k}` (this op takes none)")));
                }
                Ok(())
            }
            Some(a) => a.at().only(keys).map_err(|e| match e {
                ImportError::At { path, message } => {
                    ImportError::At { path, message: message.replace("unknown field", "unknown attribute") }
                }
                other => other,
            }),
            None => Ok(()),
        }
    }

    fn opt(&self, name: &str) -> Result<Option<Child<'a>>, ImportError> {
        match self.at {
            Some(a) => a.at().opt(name),
            None => Ok(None),
        }
    }

    fn req(&self, name: &str) -> Result<Child<'a>, ImportError> {
        self.opt(name)?.ok_or_else(|| err(&format!("{}.attrs", self.node_path), format!("missing attribute `{name}`")))
    }
}

/// An axis attribute; negative counts from the end of the first operand's rank.
fn axis(c: &Child, rank: usize) -> Result<usize, ImportError> {
    let raw = c.at().i64()?;
    let r = rank as i64;
    let v = if raw < 0 { raw + r } else { raw };
    if v < 0 || v >= r {
        return Err(err(&c.path, format!("axis {raw} is out of range for rank {rank}")));
    }
    Ok(v as usize)
}

/// Reads the op named `name` and its attributes; `rank` is the rank of the
/// node's first operand (0 if none), against which axes are resolved.
pub(super) fn read_op(
    dims: &Dims,
    name: &str,
    op_path: &str,
    node_path: &str,
    attrs: Option<&Child>,
    rank: usize,
) -> Result<Op, ImportError> {
    let a = Attrs { at: attrs, node_path };
    let size = |c: &Child| read_size(dims, &c.at());
    let shape = |c: &Child| read_shape(dims, &c.at());
    let op = match name {
        "einsum" => {
            a.allow(&["spec"])?;
            let c = a.req("spec")?;
            let text = c.at().str()?;
            Op::Einsum(EinsumSpec::parse(text).map_err(|m| err(&c.path, m))?)
        }
        "matmul" => {
            a.allow(&["transpose_b"])?;
            let transpose_b = match a.opt("transpose_b")? {
                Some(c) => c.at().bool()?,
                None => false,
            };
            Op::MatMul { transpose_b }
        }
        "concat" => {
            a.allow(&["axis"])?;
            Op::Concat { axis: axis(&a.req("axis")?, rank)? }
        }
        "broadcast" => {
            a.allow(&["shape"])?;
            Op::Broadcast { shape: shape(&a.req("shape")?)? }
        }
        "slice" => {
            a.allow(&["axis", "start", "end"])?;
            Op::Slice { axis: axis(&a.req("axis")?, rank)?, start: size(&a.req("start")?)?, end: size(&a.req("end")?)? }
        }
        "reshape" => {
            a.allow(&["shape"])?;
            Op::Reshape { shape: shape(&a.req("shape")?)? }
        }
        "transpose" => {
            a.allow(&["perm"])?;
            let c = a.req("perm")?;
            let mut perm = Vec::new();
            for item in c.at().array()? {
                let p = item.at().i64()?;
                perm.push(usize::try_from(p).map_err(|_| err(&item.path, format!("perm entry {p} is negative")))?);
            }
            Op::Transpose { perm }
        }
        "softmax" => {
            a.allow(&["axis"])?;
            let axis = match a.opt("axis")? {
                Some(c) => axis(&c, rank)?,
                None => rank.saturating_sub(1),
            };
            Op::Softmax { axis }
        }
        "exp" | "neg" | "rsqrt" | "silu" | "tanh" => {
            a.allow(&[])?;
            Op::Unary(match name {
                "exp" => UnaryOp::Exp,
                "neg" => UnaryOp::Neg,
                "rsqrt" => UnaryOp::Rsqrt,
                "silu" => UnaryOp::Silu,
                _ => UnaryOp::Tanh,
            })
        }
        "gelu" => {
            a.allow(&["approximate"])?;
            match a.opt("approximate")? {
                None => Op::Unary(UnaryOp::Gelu),
                Some(c) => match c.at().str()? {
                    "none" => Op::Unary(UnaryOp::Gelu),
                    "tanh" => Op::Unary(UnaryOp::GeluTanh),
                    other => {
                        return Err(err(&c.path, format!("approximate must be \"none\" or \"tanh\", got `{other}`")))
                    }
                },
            }
        }
        "add" | "sub" | "mul" | "div" => {
            a.allow(&[])?;
            Op::Binary(match name {
                "add" => BinaryOp::Add,
                "sub" => BinaryOp::Sub,
                "mul" => BinaryOp::Mul,
                _ => BinaryOp::Div,
            })
        }
        "reduce_sum" | "reduce_max" => {
            a.allow(&["axes", "keepdims"])?;
            let mut axes = Vec::new();
            for item in a.req("axes")?.at().array()? {
                axes.push(axis(&item, rank)?);
            }
            let keepdims = match a.opt("keepdims")? {
                Some(c) => c.at().bool()?,
                None => false,
            };
            let op = if name == "reduce_sum" { ReduceOp::Sum } else { ReduceOp::Max };
            Op::Reduce { op, axes, keepdims }
        }
        "rms_norm" | "layer_norm" => {
            a.allow(&["eps"])?;
            let c = a.req("eps")?;
            let eps = c.at().f64()?;
            if !(eps > 0.0 && eps.is_finite()) {
                return Err(err(&c.path, format!("eps must be a positive number, got {eps}")));
            }
            if name == "rms_norm" {
                Op::RmsNorm { eps }
            } else {
                Op::LayerNorm { eps }
            }
        }
        "rope" => {
            a.allow(&["theta"])?;
            let theta = match a.opt("theta")? {
                Some(c) => {
                    let t = c.at().f64()?;
                    if !(t > 0.0 && t.is_finite()) {
                        return Err(err(&c.path, format!("theta must be a positive number, got {t}")));
                    }
                    t
                }
                None => 10000.0,
            };
            Op::Rope { theta }
        }
        "gather" => {
            a.allow(&[])?;
            Op::Gather
        }
        "scale" => {
            a.allow(&["value"])?;
            Op::Scale { value: finite(&a.req("value")?)? }
        }
        "constant" => {
            a.allow(&["value", "shape"])?;
            let shape = match a.opt("shape")? {
                Some(c) => shape(&c)?,
                None => Vec::new(),
            };
            Op::Constant { value: finite(&a.req("value")?)?, shape }
        }
        "causal_mask" => {
            a.allow(&["query", "key", "offset"])?;
            let query = size(&a.req("query")?)?;
            let key = size(&a.req("key")?)?;
            let offset = size(&a.req("offset")?)?;
            Op::CausalMask { query, key, offset }
        }
        other => {
            return Err(err(op_path, format!("unknown op `{other}` (known ops: {})", OP_NAMES.join(", "))));
        }
    };
    Ok(op)
}

fn finite(c: &Child) -> Result<f64, ImportError> {
    let v = c.at().f64()?;
    if !v.is_finite() {
        return Err(err(&c.path, format!("expected a finite number, got {v}")));
    }
    Ok(v)
}
