//! What the router does when a replica does not answer a request well, pure. A request whose
//! client has not had a byte yet is tried once more on another replica when its Mac failed to
//! connect, refused it for capacity (an agent's 429 or 503 is a signal that another Mac with room
//! should take it), went not ready, or stalled; a client whose answer is already flowing gets a
//! definite error event on its stream, never a silent cut or a hang.

/// How one attempt on a replica ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The connection to the agent's serving port could not be made.
    ConnectFailed,
    /// The agent refused the request for capacity or readiness (429 or 503).
    Refused { status: u16 },
    /// The replica went not ready (its report, or its pulse) while the request waited on it.
    WentNotReady,
    /// No byte came back within the stall window (the router saw its own requests stop).
    Stalled,
    /// The connection broke or the replica stopped after part of the answer had been sent on.
    BrokeMidAnswer,
    /// An answer came back: passed to the client as it is (the engine's own 4xx/5xx included:
    /// another replica would answer the same request the same way).
    Answered { status: u16 },
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Pass the answer on.
    PassOn,
    /// Pick another replica (not one tried already) and send the request again.
    TryAnother,
    /// Nothing has reached the client and no retry is left: answer with this status
    /// (503 with a Retry-After).
    Refuse { status: u16 },
    /// The answer is flowing: end the stream with an error event carrying this code.
    StreamError { code: &'static str },
}

/// Attempts a request gets in all: the first and one retry.
pub const MAX_ATTEMPTS: u32 = 2;

/// The decision after `attempt`, the `attempts` made so far (this one included), and whether the
/// client has had any byte of an answer.
pub fn next(attempt: Attempt, attempts: u32, client_has_bytes: bool) -> Next {
    let retryable = matches!(
        attempt,
        Attempt::ConnectFailed | Attempt::WentNotReady | Attempt::Stalled | Attempt::Refused { status: 429 | 503 }
    );
    match attempt {
        Attempt::Answered { .. } => Next::PassOn,
        Attempt::BrokeMidAnswer if client_has_bytes => Next::StreamError { code: "replica_lost" },
        Attempt::Stalled if client_has_bytes => Next::StreamError { code: "stream_stalled" },
        _ if client_has_bytes => Next::StreamError { code: "replica_lost" },
        _ if retryable && attempts < MAX_ATTEMPTS => Next::TryAnother,
        Attempt::Refused { status } => Next::Refuse { status },
        _ => Next::Refuse { status: 503 },
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_failure_before_any_byte_is_tried_once_more_then_refused() {
        assert_eq!(next(Attempt::ConnectFailed, 1, false), Next::TryAnother);
        assert_eq!(next(Attempt::ConnectFailed, 2, false), Next::Refuse { status: 503 });
        assert_eq!(next(Attempt::Refused { status: 429 }, 1, false), Next::TryAnother);
        assert_eq!(next(Attempt::Refused { status: 429 }, 2, false), Next::Refuse { status: 429 });
        assert_eq!(next(Attempt::Stalled, 1, false), Next::TryAnother);
        assert_eq!(next(Attempt::WentNotReady, 1, false), Next::TryAnother);
    }

    #[test]
    fn a_flowing_answer_ends_with_an_error_event_never_a_retry() {
        assert_eq!(next(Attempt::BrokeMidAnswer, 1, true), Next::StreamError { code: "replica_lost" });
        assert_eq!(next(Attempt::Stalled, 1, true), Next::StreamError { code: "stream_stalled" });
    }

    #[test]
    fn an_answer_is_passed_on_whatever_its_status() {
        for status in [200, 400, 404, 500, 504] {
            assert_eq!(next(Attempt::Answered { status }, 1, false), Next::PassOn);
        }
    }

    fn attempt() -> impl Strategy<Value = Attempt> {
        prop_oneof![
            Just(Attempt::ConnectFailed),
            (400u16..600).prop_map(|status| Attempt::Refused { status }),
            Just(Attempt::WentNotReady),
            Just(Attempt::Stalled),
            Just(Attempt::BrokeMidAnswer),
            (100u16..600).prop_map(|status| Attempt::Answered { status }),
        ]
    }

    proptest! {
        #[test]
        fn no_request_is_sent_more_than_twice_or_retried_after_the_client_had_bytes(
            a in attempt(), attempts in 1u32..5, has_bytes in any::<bool>()
        ) {
            let n = next(a, attempts, has_bytes);
            if n == Next::TryAnother {
                prop_assert!(attempts < MAX_ATTEMPTS && !has_bytes);
            }
            if has_bytes && !matches!(a, Attempt::Answered { .. }) {
                let is_stream_error = matches!(n, Next::StreamError { .. });
                prop_assert!(is_stream_error, "{:?}", n);
            }
        }
    }
}
