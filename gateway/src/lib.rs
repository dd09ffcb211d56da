//! Spindle's gateway: the HTTP front ([`http`]), the userspace descriptor router and the table
//! of requests in flight ([`dataplane`]), worker process supervision ([`supervisor`]) and
//! Prometheus metrics ([`metrics`]). The `spindle` binary (main.rs) wires them together.

pub mod dataplane;
pub mod http;
pub mod metrics;
pub mod supervisor;
