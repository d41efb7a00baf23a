//! The reference interpreter (f32).
