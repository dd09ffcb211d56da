//! The plan: numeric ids for chains and for each (chain, function) stage, derived from a
//! validated config. The gateway and every worker compute it from the same config text, so
//! both sides agree on which id means which function without a registry.
//!
//! Function id 0 is the gateway. A function used by two chains gets one stage (and one set of
//! worker processes) per chain, because each chain has its own arena and a worker maps only
//! its own chain's arena.

use proto::GATEWAY_FN;

use crate::config::{ChainSpec, Config, FunctionSpec, Routing};

#[derive(Debug, Clone)]
pub struct Stage {
    pub fn_id: u32,
    pub function: FunctionSpec,
}

#[derive(Debug, Clone)]
pub struct ChainPlan {
    pub id: u16,
    pub spec: ChainSpec,
    /// Static chains: in step order. Dynamic chains: the entry function first.
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub chains: Vec<ChainPlan>,
}

impl Plan {
    pub fn new(config: &Config) -> Plan {
        let mut next_id = GATEWAY_FN + 1;
        let chains = config
            .chains
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let names: Vec<&str> = match &spec.routing {
                    Routing::Static { steps } => steps.iter().map(String::as_str).collect(),
                    Routing::Dynamic {
                        entry, functions, ..
                    } => std::iter::once(entry.as_str())
                        .chain(functions.iter().map(String::as_str).filter(|f| f != entry))
                        .collect(),
                };
                let stages = names
                    .into_iter()
                    .map(|name| {
                        let function = config
                            .function(name)
                            .expect("validated config names only defined functions")
                            .clone();
                        let stage = Stage {
                            fn_id: next_id,
                            function,
                        };
                        next_id += 1;
                        stage
                    })
                    .collect();
                ChainPlan {
                    id: u16::try_from(index).expect("chain count is bounded by validation"),
                    spec: spec.clone(),
                    stages,
                }
            })
            .collect();
        Plan { chains }
    }

    pub fn chain(&self, id: u16) -> Option<&ChainPlan> {
        self.chains.get(usize::from(id))
    }

    pub fn chain_by_name(&self, name: &str) -> Option<&ChainPlan> {
        self.chains.iter().find(|c| c.spec.name == name)
    }
}

impl ChainPlan {
    pub fn first_fn(&self) -> u32 {
        self.stages[0].fn_id
    }

    pub fn stage(&self, fn_id: u32) -> Option<&Stage> {
        self.stages.iter().find(|s| s.fn_id == fn_id)
    }

    pub fn stage_by_name(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.function.name == name)
    }

    pub fn is_dynamic(&self) -> bool {
        matches!(self.spec.routing, Routing::Dynamic { .. })
    }

    /// Most functions a request may pass through before it is stopped.
    pub fn max_hops(&self) -> u8 {
        match &self.spec.routing {
            Routing::Static { steps } => u8::try_from(steps.len()).unwrap_or(u8::MAX),
            Routing::Dynamic { max_hops, .. } => *max_hops,
        }
    }

    /// Static chains: the function after `fn_id`, or the gateway after the last step.
    /// Dynamic chains have no fixed successor: the guest names it.
    pub fn static_next(&self, fn_id: u32) -> Option<u32> {
        if self.is_dynamic() {
            return None;
        }
        let pos = self.stages.iter().position(|s| s.fn_id == fn_id)?;
        Some(self.stages.get(pos + 1).map_or(GATEWAY_FN, |s| s.fn_id))
    }

    /// The names a dynamic chain's functions may pass to `spindle.next`, with their ids.
    pub fn routes(&self) -> Option<Vec<(String, u32)>> {
        self.is_dynamic().then(|| {
            self.stages
                .iter()
                .map(|s| (s.function.name.clone(), s.fn_id))
                .collect()
        })
    }
}
