//! Why an agent's serving port refused a request, in the words it answers with: one HTTP status,
//! one OpenAI-style `error.type`, and one label, the answer's `error.code` and the `reason` of
//! the agent's rejection metric. Here, below the agent, so that its clients (calibrate, the
//! router) read refusals with the very words the agent writes them in.

/// Why a request was refused. Each maps to one HTTP status and one label (`reason`).
///
/// The labels are the variant names in snake case (`QueueFull` is `queue_full`), written and read
/// back by strum's derives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumString, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Rejection {
    QueueFull,
    QueueTimeout,
    NotReady,
    TooLarge,
    CircuitOpen,
    /// The client took too long to send its request.
    RequestTimeout,
    /// No or a wrong API key, on a model that asks for one.
    Unauthorized,
    /// The serving port holds as many connections as it takes.
    ConnectionLimit,
    /// The client's address holds as many of the port's connections as one address may.
    ClientConnectionLimit,
    /// Request bodies being read or waiting hold all the memory the port or the agent gives
    /// them.
    BodyMemory,
    /// The request is not one the engine may see: not JSON, nested too deep, more engine tasks
    /// than the model takes at once, or a field outside what the engine handles safely.
    InvalidInput,
}

impl Rejection {
    /// Every refusal, listed by the compiler (strum's `VariantArray`): a new one gets its metric
    /// series and its parsing without anyone remembering a list.
    pub const ALL: &'static [Rejection] = <Rejection as strum::VariantArray>::VARIANTS;

    /// The label: the answer's `error.code` and the metric's `reason`.
    pub fn reason(self) -> &'static str {
        self.into()
    }

    /// The refusal an answer's `error.code` names; None for any other code (the engine's own
    /// errors carry codes of their own, some not even strings).
    pub fn from_reason(code: &str) -> Option<Self> {
        code.parse().ok()
    }

    pub fn status(self) -> u16 {
        match self {
            Rejection::QueueFull => 429,
            Rejection::TooLarge => 413,
            Rejection::RequestTimeout => 408,
            Rejection::Unauthorized => 401,
            Rejection::InvalidInput => 400,
            Rejection::QueueTimeout
            | Rejection::NotReady
            | Rejection::CircuitOpen
            | Rejection::ConnectionLimit
            | Rejection::ClientConnectionLimit
            | Rejection::BodyMemory => 503,
        }
    }

    /// Whether the refusal says the model is busy: the saturation signal the pulse's grade
    /// weighs. A refusal of the client's own request (a bad key, a bad or oversized body, one
    /// address's connection share) says nothing about the engine, and a client sending such
    /// requests must not make a sick engine look merely busy.
    pub fn means_busy(self) -> bool {
        matches!(self, Rejection::QueueFull | Rejection::QueueTimeout | Rejection::ConnectionLimit)
    }

    /// The OpenAI-style `error.type`.
    pub fn error_type(self) -> &'static str {
        match self {
            Rejection::QueueFull => "rate_limit_error",
            Rejection::TooLarge | Rejection::RequestTimeout | Rejection::InvalidInput => "invalid_request_error",
            Rejection::Unauthorized => "authentication_error",
            Rejection::QueueTimeout
            | Rejection::NotReady
            | Rejection::CircuitOpen
            | Rejection::ConnectionLimit
            | Rejection::ClientConnectionLimit
            | Rejection::BodyMemory => "unavailable_error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The labels are a contract: metric series and dashboards use them, clients parse them.
    #[test]
    fn every_refusal_has_its_label_and_is_read_back_from_it() {
        let labels: Vec<&str> = Rejection::ALL.iter().map(|r| r.reason()).collect();
        assert_eq!(
            labels,
            [
                "queue_full",
                "queue_timeout",
                "not_ready",
                "too_large",
                "circuit_open",
                "request_timeout",
                "unauthorized",
                "connection_limit",
                "client_connection_limit",
                "body_memory",
                "invalid_input",
            ]
        );
        for &r in Rejection::ALL {
            assert_eq!(Rejection::from_reason(r.reason()), Some(r));
        }
    }

    #[test]
    fn codes_that_name_no_refusal_are_none() {
        for code in ["", "QueueFull", "queue-full", "Queue_Full", "queue_full ", "503", "server_error"] {
            assert_eq!(Rejection::from_reason(code), None, "{code:?}");
        }
    }
}
