//! Spindle's gateway: the HTTP front ([`http`]), the userspace descriptor router and the table
//! of requests in flight ([`dataplane`]), each instance's bounded outbound queue ([`queue`]),
//! worker process supervision ([`supervisor`], over exec'd or forked [`process`]es, with each
//! forking function's [`zygote`]), Prometheus metrics ([`metrics`]) and the node service that
//! prepares images of running instances and serves their pages ([`node`]), and scale-out onto
//! peer nodes over a node budget with request forwarding ([`peers`], [`budget`]). The
//! `spindle` binary (main.rs) wires them together.
//!
//! It owns every request from its HTTP arrival to its answer, and every worker process's life.
//! It must not run guest code or build instances (that is `chain-runtime`'s), define a wire
//! layout (`proto`'s) or touch eBPF maps except through `sockmap-bpf`. Module dependencies
//! point one way: `http` → `dataplane`, `metrics` → `dataplane` (it reads the counters the
//! dataplane exports), `supervisor` → `dataplane` + `queue` + `process` + `zygote` + `node`
//! (it puts each ready worker's control socket on the node's board), `zygote` → `process` +
//! `supervisor`'s exec helper, `node` → `dataplane` + `metrics`.

pub mod budget;
pub mod dataplane;
pub mod front;
pub mod http;
pub mod ingress;
pub mod metrics;
pub mod node;
pub mod payload;
pub mod peers;
pub mod process;
pub mod queue;
pub mod reload;
pub mod scaler;
pub mod shards;
pub mod supervisor;
pub mod zygote;
