//! Fuzz corpus generation and replay (filled in below).
