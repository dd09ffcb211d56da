//! spindle bench (being written).
