//! The operator vocabulary of a decode graph.

use super::poly::Poly;
use std::fmt;

pub type Shape = Vec<Poly>;

/// A parsed einsum equation such as `bgpnk,gmk->bgpnm`: one subscript string
/// per operand and one for the result. Every subscript is a single letter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EinsumSpec {
    pub inputs: Vec<Vec<char>>,
    pub output: Vec<char>,
}

impl EinsumSpec {
    /// Parses and checks the letters (not the shapes): explicit `->` form,
    /// letters only, no letter twice in one operand, every output letter
    /// present in some input.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (lhs, rhs) = text
            .split_once("->")
            .ok_or_else(|| format!("einsum spec `{text}` has no `->` (implicit output is not supported)"))?;
        let inputs: Vec<Vec<char>> = lhs.split(',').map(|s| s.trim().chars().collect()).collect();
        let output: Vec<char> = rhs.trim().chars().collect();
        for (i, sub) in inputs.iter().chain(std::iter::once(&output)).enumerate() {
            let which = if i < inputs.len() { format!("operand {i}") } else { "the output".to_string() };
            for (j, c) in sub.iter().enumerate() {
                if !c.is_ascii_alphabetic() {
                    return Err(format!("einsum spec `{text}`: {which} has `{c}`, subscripts must be letters"));
                }
                if sub[..j].contains(c) {
                    return Err(format!("einsum spec `{text}`: {which} repeats subscript `{c}`"));
                }
            }
        }
        for c in &output {
            if !inputs.iter().any(|s| s.contains(c)) {
                return Err(format!("einsum spec `{text}`: output subscript `{c}` appears in no operand"));
            }
        }
        Ok(Self { inputs, output })
    }
}

impl fmt::Display for EinsumSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ins: Vec<String> = self.inputs.iter().map(|s| s.iter().collect()).collect();
        let out: String = self.output.iter().collect();
        write!(f, "{}->{}", ins.join(","), out)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Exp,
    Neg,
    Rsqrt,
    Silu,
    /// `0.5 x (1 + erf(x / sqrt 2))`.
    Gelu,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (GPT-2's `gelu_new`).
    GeluTanh,
    Tanh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// An operation. Axes are stored normalized (non-negative).
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Einsum(EinsumSpec),
    /// numpy `matmul` over the last two axes with broadcast batch axes;
    /// `transpose_b` reads `b` as `[.., n, k]` (a PyTorch `Linear` weight).
    MatMul {
        transpose_b: bool,
    },
    Concat {
        axis: usize,
    },
    /// numpy-style broadcast to `shape`: new leading axes and size-1 axes expand.
    Broadcast {
        shape: Shape,
    },
    /// `[start, end)` along `axis`.
    Slice {
        axis: usize,
        start: Poly,
        end: Poly,
    },
    Reshape {
        shape: Shape,
    },
    Transpose {
        perm: Vec<usize>,
    },
    Softmax {
        axis: usize,
    },
    Unary(UnaryOp),
    /// numpy broadcasting between the two operands.
    Binary(BinaryOp),
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keepdims: bool,
    },
    /// `x / sqrt(mean(x^2, last) + eps) * weight`.
    RmsNorm {
        eps: f64,
    },
    /// `(x - mean) / sqrt(var + eps) * weight + bias` over the last axis.
    LayerNorm {
        eps: f64,
    },
    /// Rotary embedding, "rotate half" form (Llama/NeoX), on `x: [b, H, n, k]`
    /// with `positions: [b, n]`.
    Rope {
        theta: f64,
    },
    /// Rows of `table: [V, d]` picked by integer `ids: [...]` → `[..., d]`.
    Gather,
    /// `x * value`.
    Scale {
        value: f64,
    },
    /// A tensor filled with `value`.
    Constant {
        value: f64,
        shape: Shape,
    },
    /// Additive mask `[query, key]`: `0` where `key_pos <= offset + query_pos`,
    /// `-inf` elsewhere.
    CausalMask {
        query: Poly,
        key: Poly,
        offset: Poly,
    },
}

impl Op {
    /// The op's name as written in model.json.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Einsum(_) => "einsum",
            Op::MatMul { .. } => "matmul",
            Op::Concat { .. } => "concat",
            Op::Broadcast { .. } => "broadcast",
            Op::Slice { .. } => "slice",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Softmax { .. } => "softmax",
            Op::Unary(u) => match u {
                UnaryOp::Exp => "exp",
                UnaryOp::Neg => "neg",
                UnaryOp::Rsqrt => "rsqrt",
                UnaryOp::Silu => "silu",
                UnaryOp::Gelu | UnaryOp::GeluTanh => "gelu",
                UnaryOp::Tanh => "tanh",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "add",
                BinaryOp::Sub => "sub",
                BinaryOp::Mul => "mul",
                BinaryOp::Div => "div",
            },
            Op::Reduce { op: ReduceOp::Sum, .. } => "reduce_sum",
            Op::Reduce { op: ReduceOp::Max, .. } => "reduce_max",
            Op::RmsNorm { .. } => "rms_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Rope { .. } => "rope",
            Op::Gather => "gather",
            Op::Scale { .. } => "scale",
            Op::Constant { .. } => "constant",
            Op::CausalMask { .. } => "causal_mask",
        }
    }

    /// True for ops that only re-index data (no arithmetic): a lowering can
    /// make them views, and the bytes model reads through them.
    pub fn is_view(&self) -> bool {
        matches!(
            self,
            Op::Concat { .. } | Op::Broadcast { .. } | Op::Slice { .. } | Op::Reshape { .. } | Op::Transpose { .. }
        )
    }
}

/// Every op name model.json accepts, for error messages and docs.
pub const OP_NAMES: &[&str] = &[
    "einsum",
    "matmul",
    "concat",
    "broadcast",
    "slice",
    "reshape",
    "transpose",
    "softmax",
    "exp",
    "neg",
    "rsqrt",
    "silu",
    "gelu",
    "tanh",
    "add",
    "sub",
    "mul",
    "div",
    "reduce_sum",
    "reduce_max",
    "rms_norm",
    "layer_norm",
    "rope",
    "gather",
    "scale",
    "constant",
    "causal_mask",
];
