//! Size expressions of the manifest (`ceil((4*b*m_c)/256)`): integers, dim
//! names, `+ - * /`, parentheses, `ceil(…)` and `floor(…)`, evaluated exactly
//! (as rationals) at the runtime dims. The runtime cannot use the compiler's polynomials, so it
//! has this small parser of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Errors from parsing or evaluating a size expression.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    #[error("size expression `{text}`: {message}")]
    Syntax { text: String, message: String },
    #[error("dim `{0}` has no value")]
    Unbound(String),
    #[error("division by zero")]
    DivisionByZero,
    #[error("arithmetic overflows")]
    Overflow,
    #[error("value is not a whole number: {0} (wrap the division in ceil() or floor())")]
    NotWhole(String),
    #[error("{0}")]
    Range(String),
}

/// A parsed size expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Int(i64),
    Name(String),
    Neg(Box<Expr>),
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    Ceil(Box<Expr>),
    Floor(Box<Expr>),
}

impl Expr {
    /// Every dim name mentioned, sorted.
    pub fn names(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        self.collect(&mut out);
        out
    }

    fn collect(&self, out: &mut BTreeSet<String>) {
        match self {
            Expr::Int(_) => {}
            Expr::Name(n) => {
                out.insert(n.clone());
            }
            Expr::Neg(a) | Expr::Ceil(a) | Expr::Floor(a) => a.collect(out),
            Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) => {
                a.collect(out);
                b.collect(out);
            }
        }
    }

    /// Evaluates with every name bound by `dims`; the result must be whole.
    pub fn eval(&self, dims: &BTreeMap<String, i64>) -> Result<i64, ExprError> {
        let r = self.rational(dims)?;
        if r.den != 1 {
            return Err(ExprError::NotWhole(format!("{}/{}", r.num, r.den)));
        }
        i64::try_from(r.num).map_err(|_| ExprError::Overflow)
    }

    fn rational(&self, dims: &BTreeMap<String, i64>) -> Result<Ratio, ExprError> {
        Ok(match self {
            Expr::Int(v) => Ratio::int(*v as i128),
            Expr::Name(n) => Ratio::int(*dims.get(n).ok_or_else(|| ExprError::Unbound(n.clone()))? as i128),
            Expr::Neg(a) => {
                let a = a.rational(dims)?;
                Ratio { num: a.num.checked_neg().ok_or(ExprError::Overflow)?, den: a.den }
            }
            Expr::Add(a, b) => a.rational(dims)?.add(b.rational(dims)?)?,
            Expr::Sub(a, b) => {
                let b = b.rational(dims)?;
                a.rational(dims)?.add(Ratio { num: b.num.checked_neg().ok_or(ExprError::Overflow)?, den: b.den })?
            }
            Expr::Mul(a, b) => a.rational(dims)?.mul(b.rational(dims)?)?,
            Expr::Div(a, b) => {
                let b = b.rational(dims)?;
                if b.num == 0 {
                    return Err(ExprError::DivisionByZero);
                }
                a.rational(dims)?.mul(Ratio::new(b.den, b.num)?)?
            }
            Expr::Ceil(a) => {
                let a = a.rational(dims)?;
                Ratio::int(a.num.div_euclid(a.den) + i128::from(a.num.rem_euclid(a.den) != 0))
            }
            Expr::Floor(a) => {
                let a = a.rational(dims)?;
                Ratio::int(a.num.div_euclid(a.den))
            }
        })
    }
}

/// An exact fraction with a positive denominator, in lowest terms.
#[derive(Clone, Copy, Debug)]
struct Ratio {
    num: i128,
    den: i128,
}

impl Ratio {
    fn int(v: i128) -> Self {
        Ratio { num: v, den: 1 }
    }

    fn new(num: i128, den: i128) -> Result<Self, ExprError> {
        if den == 0 {
            return Err(ExprError::DivisionByZero);
        }
        let g = gcd(num.unsigned_abs(), den.unsigned_abs()).max(1) as i128;
        let sign = if den < 0 { -1 } else { 1 };
        Ok(Ratio { num: sign * (num / g), den: sign * (den / g) })
    }

    fn add(self, o: Ratio) -> Result<Self, ExprError> {
        let num = self
            .num
            .checked_mul(o.den)
            .and_then(|a| o.num.checked_mul(self.den).and_then(|b| a.checked_add(b)))
            .ok_or(ExprError::Overflow)?;
        Ratio::new(num, self.den.checked_mul(o.den).ok_or(ExprError::Overflow)?)
    }

    fn mul(self, o: Ratio) -> Result<Self, ExprError> {
        let num = self.num.checked_mul(o.num).ok_or(ExprError::Overflow)?;
        Ratio::new(num, self.den.checked_mul(o.den).ok_or(ExprError::Overflow)?)
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Parses a size expression.
pub fn parse_expr(text: &str) -> Result<Expr, ExprError> {
    let syntax = |message: String| ExprError::Syntax { text: text.to_string(), message };
    let tokens = lex(text).map_err(syntax)?;
    let mut parser = Parser { tokens, pos: 0 };
    let expr = parser.sum().map_err(syntax)?;
    if let Some(token) = parser.tokens.get(parser.pos) {
        return Err(syntax(format!("unexpected `{token}`")));
    }
    Ok(expr)
}

/// Parses and evaluates a size expression with every name bound by `dims`.
pub fn eval_expr(text: &str, dims: &BTreeMap<String, i64>) -> Result<i64, ExprError> {
    parse_expr(text)?.eval(dims)
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Int(i64),
    Name(String),
    Sym(char),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Int(v) => write!(f, "{v}"),
            Token::Name(n) => f.write_str(n),
            Token::Sym(c) => write!(f, "{c}"),
        }
    }
}

fn lex(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let digits: String = chars[start..i].iter().collect();
            out.push(Token::Int(digits.parse().map_err(|_| format!("number `{digits}` is too large"))?));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token::Name(chars[start..i].iter().collect()));
        } else if "+-*/()".contains(c) {
            out.push(Token::Sym(c));
            i += 1;
        } else {
            return Err(format!("unexpected character `{c}`"));
        }
    }
    if out.is_empty() {
        return Err("empty expression".to_string());
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn sum(&mut self) -> Result<Expr, String> {
        let mut acc = self.product()?;
        while let Some(Token::Sym(op @ ('+' | '-'))) = self.peek().cloned() {
            self.pos += 1;
            let rhs = self.product()?;
            acc = if op == '+' { Expr::Add(acc.into(), rhs.into()) } else { Expr::Sub(acc.into(), rhs.into()) };
        }
        Ok(acc)
    }

    fn product(&mut self) -> Result<Expr, String> {
        let mut acc = self.unary()?;
        while let Some(Token::Sym(op @ ('*' | '/'))) = self.peek().cloned() {
            self.pos += 1;
            let rhs = self.unary()?;
            acc = if op == '*' { Expr::Mul(acc.into(), rhs.into()) } else { Expr::Div(acc.into(), rhs.into()) };
        }
        Ok(acc)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        let token = self.peek().cloned().ok_or("expression ends too early")?;
        self.pos += 1;
        match token {
            Token::Int(v) => Ok(Expr::Int(v)),
            Token::Sym('-') => Ok(Expr::Neg(self.unary()?.into())),
            Token::Sym('(') => self.parenthesized(),
            Token::Name(name) if matches!(self.peek(), Some(Token::Sym('('))) => {
                self.pos += 1;
                let inner = self.parenthesized()?;
                match name.as_str() {
                    "ceil" => Ok(Expr::Ceil(inner.into())),
                    "floor" => Ok(Expr::Floor(inner.into())),
                    _ => Err(format!("unknown function `{name}` (known: ceil, floor)")),
                }
            }
            Token::Name(name) => Ok(Expr::Name(name)),
            other => Err(format!("unexpected `{other}`")),
        }
    }

    /// The rest of `( … )` after the opening parenthesis.
    fn parenthesized(&mut self) -> Result<Expr, String> {
        let inner = self.sum()?;
        match self.peek() {
            Some(Token::Sym(')')) => {
                self.pos += 1;
                Ok(inner)
            }
            _ => Err("missing `)`".to_string()),
        }
    }
}
