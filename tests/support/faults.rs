//! Seeded random faults for the fakes: a [`FaultPlan`] says, per route, how often a request goes
//! wrong and how (an error status, a write carried out whose answer is lost, a connection closed
//! mid-stream), and how long each request waits first.
//!
//! Draws are a pure function of the seed, the route and the request's ordinal on that route (a
//! SplitMix64 hash, no shared generator), so the faults a run meets are fixed by its seed: with
//! one job at a time a run repeats exactly; with many, the same ordinals of each route fail,
//! whatever order the jobs' requests arrive in.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

/// What happens to a request that draws a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// Answered with this status (and the service's error body); nothing is carried out.
    Status(u16),
    /// Carried out, then answered with this status: the write happened, its answer is lost.
    StatusAfter(u16),
    /// Carried out, then the connection closes before the answer's body arrives.
    CloseAfter,
    /// A streamed answer (model SSE, an envd process stream) stops partway and the connection
    /// closes.
    CutStream,
}

impl Injected {
    /// A short label for reports: `503`, `502-after`, `close-after`, `cut`.
    pub fn label(&self) -> String {
        match self {
            Injected::Status(s) => s.to_string(),
            Injected::StatusAfter(s) => format!("{s}-after"),
            Injected::CloseAfter => "close-after".into(),
            Injected::CutStream => "cut".into(),
        }
    }
}

/// One line of a plan: requests on `route` meet `fault` with `probability`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub route: String,
    pub probability: f64,
    pub fault: Injected,
}

/// What one request drew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    /// Waited before the request is handled.
    pub delay: Duration,
    pub fault: Option<Injected>,
}

/// A seeded set of rules, shared by the fakes of one run.
#[derive(Debug)]
pub struct FaultPlan {
    seed: u64,
    rules: Vec<Rule>,
    latency: (Duration, Duration),
    seen: Mutex<HashMap<String, u64>>,
    injected: Mutex<BTreeMap<String, u64>>,
}

impl FaultPlan {
    /// A plan with no rules and no latency: every draw is clean.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            rules: Vec::new(),
            latency: (Duration::ZERO, Duration::ZERO),
            seen: Mutex::new(HashMap::new()),
            injected: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Adds a rule. Rules of one route are tried in the order added; the first that fires wins.
    pub fn rule(mut self, route: &str, probability: f64, fault: Injected) -> Self {
        self.rules.push(Rule {
            route: route.into(),
            probability,
            fault,
        });
        self
    }

    /// Every request waits between `min` and `max` first.
    pub fn latency(mut self, min: Duration, max: Duration) -> Self {
        self.latency = (min, max.max(min));
        self
    }

    /// Multiplies every probability by `factor` (each capped at 1).
    pub fn scaled(mut self, factor: f64) -> Self {
        for rule in &mut self.rules {
            rule.probability = (rule.probability * factor).clamp(0.0, 1.0);
        }
        self
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The draw for the next request on `route`.
    pub fn draw(&self, route: &str) -> Draw {
        let n = {
            let mut seen = self.seen.lock().unwrap();
            let n = seen.entry(route.to_owned()).or_insert(0);
            *n += 1;
            *n
        };
        let mut rng = SplitMix64(self.seed ^ fnv1a(route) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (min, max) = self.latency;
        let delay = min + (max - min).mul_f64(rng.unit());
        let fault = self
            .rules
            .iter()
            .filter(|r| r.route == route)
            .find(|r| rng.unit() < r.probability)
            .map(|r| r.fault);
        if let Some(fault) = fault {
            *self
                .injected
                .lock()
                .unwrap()
                .entry(format!("{route} {}", fault.label()))
                .or_insert(0) += 1;
        }
        Draw { delay, fault }
    }

    /// How many faults of each kind were injected, as `route label → count`.
    pub fn injected(&self) -> BTreeMap<String, u64> {
        self.injected.lock().unwrap().clone()
    }

    /// How many requests each route saw.
    pub fn seen(&self) -> BTreeMap<String, u64> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// A tiny, good-enough generator: SplitMix64.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// A response whose body fails at once: the client gets (at most) the status line and headers,
/// then the connection closes, as when a connection drops after the server did the work.
pub fn closed_response() -> axum::response::Response {
    let body = axum::body::Body::from_stream(futures::stream::iter([Err::<bytes::Bytes, _>(
        std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "fake: connection closed",
        ),
    )]));
    axum::response::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}
