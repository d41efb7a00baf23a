//! The e-graph language: the graph ops the rules reason about, plus `op`
//! for every other op (kept opaque under a key into the analysis' table).
//!
//! Attributes are leaf symbols (see [`crate::shape`]):
//!
//! ```text
//! (in cache.0.k_ctx)                      a graph input
//! (einsum bgpnk,gmk->bgpnm ?q ?k)         operands after the spec
//! (matmul ?a ?b)  (matmul_t ?a ?b)        matmul_t: b is [.., n, k]
//! (concat 2 ?x ?y ?z)                     axis first
//! (broadcast b,g,m_c,k ?x)                target shape
//! (slice 4 0 m_c ?x)                      axis, start, end
//! (reshape b,g,p,n,k ?x)  (transpose 0,1,3,2 ?x)
//! (add ?a ?b)                             numpy broadcasting
//! (op o17 ?x ?y)                          any other op, key o17
//! ```

use egg::{define_language, Id, Symbol};

define_language! {
    pub enum Expr {
        "in" = In(Id),
        "einsum" = Einsum(Box<[Id]>),
        "matmul" = MatMul([Id; 2]),
        "matmul_t" = MatMulT([Id; 2]),
        "concat" = Concat(Box<[Id]>),
        "broadcast" = Broadcast([Id; 2]),
        "slice" = Slice([Id; 4]),
        "reshape" = Reshape([Id; 2]),
        "transpose" = Transpose([Id; 2]),
        "add" = Add([Id; 2]),
        "op" = Op(Box<[Id]>),
        Attr(Symbol),
    }
}

impl Expr {
    /// The operand e-classes (attribute children excluded).
    pub fn operands(&self) -> &[Id] {
        match self {
            Expr::In(_) | Expr::Attr(_) => &[],
            Expr::Einsum(c) | Expr::Concat(c) | Expr::Op(c) => &c[1..],
            Expr::MatMul(c) | Expr::MatMulT(c) | Expr::Add(c) => c,
            Expr::Broadcast(c) | Expr::Reshape(c) | Expr::Transpose(c) => &c[1..],
            Expr::Slice(c) => &c[3..],
        }
    }

    /// Ops that only re-index data: free in the bytes model.
    pub fn is_view(&self) -> bool {
        matches!(self, Expr::Concat(_) | Expr::Broadcast(_) | Expr::Slice(_) | Expr::Reshape(_) | Expr::Transpose(_))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Expr::In(_) => "in",
            Expr::Einsum(_) => "einsum",
            Expr::MatMul(_) | Expr::MatMulT(_) => "matmul",
            Expr::Concat(_) => "concat",
            Expr::Broadcast(_) => "broadcast",
            Expr::Slice(_) => "slice",
            Expr::Reshape(_) => "reshape",
            Expr::Transpose(_) => "transpose",
            Expr::Add(_) => "add",
            Expr::Op(_) => "op",
            Expr::Attr(_) => "attr",
        }
    }
}
