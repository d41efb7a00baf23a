//! Symbolic sizes: polynomials with integer coefficients over dim names.
//!
//! A shape entry such as `m_c+m_d+n` or `h*k` is a [`Poly`]. Model constants
//! (`h`, `k`, `d_model`, …) stay symbolic so printed shapes read like the
//! model; [`crate::shape::Constants::normalize`] substitutes them, leaving a
//! polynomial over the runtime dims (`b`, `m_c`, `m_d`, …) that can be
//! compared exactly.

use std::collections::BTreeMap;
use std::fmt;

/// A monomial: the sorted list of symbol names multiplied together
/// (`[]` is the constant term, `["b", "m_c"]` is `b*m_c`).
pub type Monomial = Vec<String>;

/// A polynomial over dim names with `i64` coefficients. Zero coefficients are
/// never stored, so structural equality is mathematical equality.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Poly {
    terms: BTreeMap<Monomial, i64>,
}

/// Arithmetic overflowed `i64` while combining sizes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("size arithmetic overflows 64 bits")]
pub struct Overflow;

impl Poly {
    pub fn zero() -> Self {
        Self::default()
    }

    pub fn constant(c: i64) -> Self {
        let mut p = Self::zero();
        if c != 0 {
            p.terms.insert(Vec::new(), c);
        }
        p
    }

    pub fn symbol(name: &str) -> Self {
        let mut p = Self::zero();
        p.terms.insert(vec![name.to_string()], 1);
        p
    }

    /// The value if this polynomial has no symbols.
    pub fn as_constant(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&Vec::new()).copied(),
            _ => None,
        }
    }

    pub fn terms(&self) -> impl Iterator<Item = (&Monomial, i64)> {
        self.terms.iter().map(|(m, c)| (m, *c))
    }

    /// Every symbol that occurs, sorted.
    pub fn symbols(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.terms.keys().flat_map(|m| m.iter().map(String::as_str)).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    pub fn add(&self, other: &Poly) -> Result<Poly, Overflow> {
        let mut out = self.clone();
        for (m, c) in &other.terms {
            let entry = out.terms.entry(m.clone()).or_insert(0);
            *entry = entry.checked_add(*c).ok_or(Overflow)?;
            if *entry == 0 {
                out.terms.remove(m);
            }
        }
        Ok(out)
    }

    /// `-self`; overflows for a coefficient of `i64::MIN`.
    pub fn neg(&self) -> Result<Poly, Overflow> {
        let terms = self.terms.iter().map(|(m, c)| Ok((m.clone(), c.checked_neg().ok_or(Overflow)?)));
        Ok(Poly { terms: terms.collect::<Result<_, Overflow>>()? })
    }

    pub fn sub(&self, other: &Poly) -> Result<Poly, Overflow> {
        self.add(&other.neg()?)
    }

    pub fn mul(&self, other: &Poly) -> Result<Poly, Overflow> {
        let mut out = Poly::zero();
        for (ma, ca) in &self.terms {
            for (mb, cb) in &other.terms {
                let mut m: Monomial = ma.iter().chain(mb.iter()).cloned().collect();
                m.sort();
                let c = ca.checked_mul(*cb).ok_or(Overflow)?;
                out = out.add(&Poly { terms: BTreeMap::from([(m, c)]) })?;
            }
        }
        Ok(out)
    }

    /// Replaces symbols by polynomials (symbols not in `values` stay).
    pub fn substitute(&self, values: &dyn Fn(&str) -> Option<Poly>) -> Result<Poly, Overflow> {
        let mut out = Poly::zero();
        for (m, c) in &self.terms {
            let mut term = Poly::constant(*c);
            for s in m {
                let v = values(s).unwrap_or_else(|| Poly::symbol(s));
                term = term.mul(&v)?;
            }
            out = out.add(&term)?;
        }
        Ok(out)
    }

    /// Evaluates with every symbol bound; `None` names the first unbound one.
    pub fn eval(&self, values: &dyn Fn(&str) -> Option<i64>) -> Result<i64, EvalError> {
        let mut total: i64 = 0;
        for (m, c) in &self.terms {
            let mut term = *c;
            for s in m {
                let v = values(s).ok_or_else(|| EvalError::Unbound(s.clone()))?;
                term = term.checked_mul(v).ok_or(EvalError::Overflow)?;
            }
            total = total.checked_add(term).ok_or(EvalError::Overflow)?;
        }
        Ok(total)
    }

    /// True when no coefficient is negative (so the value is `>= 0` whenever
    /// every symbol is).
    pub fn is_nonnegative(&self) -> bool {
        self.terms.values().all(|c| *c > 0)
    }

    /// Parses `h*k`, `m_c + m_d + 1`, `2*(a+b)`, `-1`.
    pub fn parse(text: &str) -> Result<Poly, ParseError> {
        let tokens = lex(text)?;
        let mut p = Parser { tokens, pos: 0 };
        let out = p.expr()?;
        if p.pos != p.tokens.len() {
            return Err(ParseError(format!("unexpected `{}`", p.tokens[p.pos])));
        }
        Ok(out)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("dim `{0}` has no value")]
    Unbound(String),
    #[error("size arithmetic overflows 64 bits")]
    Overflow,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

impl From<Overflow> for ParseError {
    fn from(_: Overflow) -> Self {
        ParseError("size arithmetic overflows 64 bits".into())
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Int(i64),
    Ident(String),
    Sym(char),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Int(i) => write!(f, "{i}"),
            Token::Ident(s) => write!(f, "{s}"),
            Token::Sym(c) => write!(f, "{c}"),
        }
    }
}

fn lex(text: &str) -> Result<Vec<Token>, ParseError> {
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
            let s: String = chars[start..i].iter().collect();
            let v = s.parse::<i64>().map_err(|_| ParseError(format!("number `{s}` overflows 64 bits")))?;
            out.push(Token::Int(v));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if "+-*()".contains(c) {
            out.push(Token::Sym(c));
            i += 1;
        } else {
            return Err(ParseError(format!("unexpected character `{c}`")));
        }
    }
    if out.is_empty() {
        return Err(ParseError("empty size expression".into()));
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

    fn expr(&mut self) -> Result<Poly, ParseError> {
        let mut acc = self.term()?;
        while let Some(Token::Sym(op @ ('+' | '-'))) = self.peek().cloned() {
            self.pos += 1;
            let rhs = self.term()?;
            acc = if op == '+' { acc.add(&rhs)? } else { acc.sub(&rhs)? };
        }
        Ok(acc)
    }

    fn term(&mut self) -> Result<Poly, ParseError> {
        let mut acc = self.factor()?;
        while let Some(Token::Sym('*')) = self.peek() {
            self.pos += 1;
            let rhs = self.factor()?;
            acc = acc.mul(&rhs)?;
        }
        Ok(acc)
    }

    fn factor(&mut self) -> Result<Poly, ParseError> {
        let tok = self.peek().cloned().ok_or_else(|| ParseError("expression ends too early".into()))?;
        self.pos += 1;
        match tok {
            Token::Int(v) => Ok(Poly::constant(v)),
            Token::Ident(s) => Ok(Poly::symbol(&s)),
            Token::Sym('-') => Ok(self.factor()?.neg()?),
            Token::Sym('(') => {
                let inner = self.expr()?;
                match self.peek() {
                    Some(Token::Sym(')')) => {
                        self.pos += 1;
                        Ok(inner)
                    }
                    _ => Err(ParseError("missing `)`".into())),
                }
            }
            other => Err(ParseError(format!("unexpected `{other}`"))),
        }
    }
}

impl fmt::Display for Poly {
    /// Canonical form: higher-degree terms first, then by name; `0` for zero.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return write!(f, "0");
        }
        let mut terms: Vec<(&Monomial, i64)> = self.terms().collect();
        terms.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(b.0)));
        for (i, (m, c)) in terms.iter().enumerate() {
            let (sign, mag) = (if *c < 0 { "-" } else { "+" }, c.unsigned_abs());
            if i == 0 {
                if sign == "-" {
                    write!(f, "-")?;
                }
            } else {
                write!(f, "{sign}")?;
            }
            if m.is_empty() {
                write!(f, "{mag}")?;
            } else {
                if mag != 1 {
                    write!(f, "{mag}*")?;
                }
                write!(f, "{}", m.join("*"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_canonically() {
        let p = Poly::parse("m_d + m_c + 1").unwrap();
        assert_eq!(p.to_string(), "m_c+m_d+1");
        let q = Poly::parse("k*h").unwrap();
        assert_eq!(q.to_string(), "h*k");
        assert_eq!(Poly::parse("2*(a+b)-a").unwrap().to_string(), "a+2*b");
        assert_eq!(Poly::parse("a-a").unwrap().to_string(), "0");
    }

    /// `i64::MIN` prints, and negating it is an overflow (not a panic or a
    /// wrapped sign).
    #[test]
    fn most_negative_coefficient() {
        let p = Poly::constant(i64::MIN);
        assert_eq!(p.to_string(), "-9223372036854775808");
        assert_eq!(p.neg(), Err(Overflow));
        assert_eq!(Poly::zero().sub(&p), Err(Overflow));
        assert!(Poly::parse("-(0-9223372036854775807-1)").is_err());
        assert_eq!(Poly::parse("-(0-9223372036854775807)").map(|p| p.to_string()), Ok("9223372036854775807".into()));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Poly::parse("").is_err());
        assert!(Poly::parse("a+").is_err());
        assert!(Poly::parse("a/b").is_err());
        assert!(Poly::parse("(a").is_err());
        assert!(Poly::parse("99999999999999999999").is_err());
    }

    #[test]
    fn substitutes_and_evaluates() {
        let p = Poly::parse("b*(m_c+m_d)").unwrap();
        let v = p
            .eval(&|s| match s {
                "b" => Some(32),
                "m_c" => Some(8192),
                "m_d" => Some(256),
                _ => None,
            })
            .unwrap();
        assert_eq!(v, 32 * (8192 + 256));
        let q = Poly::parse("h*k").unwrap();
        let n = q
            .substitute(&|s| match s {
                "h" => Some(Poly::constant(32)),
                _ => None,
            })
            .unwrap();
        assert_eq!(n.to_string(), "32*k");
        assert_eq!(Poly::parse("x").unwrap().eval(&|_| None), Err(EvalError::Unbound("x".into())));
    }

    #[test]
    fn overflow_is_an_error() {
        let big = Poly::constant(i64::MAX);
        assert!(big.add(&Poly::constant(1)).is_err());
        assert!(big.mul(&Poly::constant(2)).is_err());
    }
}
