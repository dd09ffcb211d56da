//! Knative-style baseline (being written).
