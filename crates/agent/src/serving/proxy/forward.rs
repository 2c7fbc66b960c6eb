//! Forwarding to the engine: inference through the admission queue (waiting for a place, the
//! engine's answer judged for the breaker, streams tapped for timings and stalls), and cheap
//! paths straight through.

use super::*;

impl ModelProxy {
    pub(super) async fn inference(
        &self,
        req: Request<Incoming>,
        started: Instant,
        access: &Access,
    ) -> Response<ProxyBody> {
        let admission = self.admission();
        let limit = admission.limits().max_request_bytes;
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return self.refuse(&admission, Rejection::TooLarge);
        }
        let (parts, body) = req.into_parts();
        // The whole body is read before a place is taken, so a slow uploader never holds one.
        let read = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).collect();
        let body = match tokio::time::timeout(self.timeouts.body, read).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                return self.refuse(&admission, Rejection::TooLarge);
            }
            Ok(Err(_)) => return client_error(StatusCode::BAD_REQUEST, "bad_body", "could not read the request body"),
            Err(_) => return self.refuse(&admission, Rejection::RequestTimeout),
        };
        let shape = match json_shape(&parts, &body) {
            Ok(shape) => shape,
            Err(mistake) => return mistake.response(),
        };

        let permit = match admission.admit(self.upstream().is_some()).await {
            Ok(p) => p,
            Err(r) => return self.refuse(&admission, r),
        };
        // Admitted while the engine restarts (a drain): wait for the new one while the queue
        // timeout allows.
        let port = match self.upstream() {
            Some(port) => port,
            None => {
                match self.wait_for_upstream(admission.limits().queue_timeout.saturating_sub(started.elapsed())).await {
                    Some(port) => port,
                    None => return self.refuse(&admission, admission.rejected(Rejection::NotReady)),
                }
            }
        };

        let upstream_req = match engine_request(&parts, port, body, access, shape) {
            Ok(r) => r,
            Err(mistake) => return mistake.response(),
        };
        let left = access.request_timeout.saturating_sub(started.elapsed());
        let resp = match tokio::time::timeout(left, self.client.request(upstream_req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                // The engine did not answer at all: that is the engine's, whoever asked.
                admission.upstream_failed();
                self.pulse_now.notify_one();
                tracing::warn!(model = %self.model, "engine unreachable: {}", crate::error::chain(&e));
                let retry = admission.retry_after(Rejection::NotReady, self.not_ready_for());
                return error_response(
                    Rejection::NotReady,
                    "the engine did not answer; it is being checked",
                    Some(retry),
                );
            }
            Err(_) => {
                self.series.request_stalls.inc();
                self.pulse_now.notify_one();
                return server_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "request_timeout",
                    &format!(
                        "the engine did not answer within spec.admission.requestTimeout {:?}; ask for fewer tokens, stream the answer, or raise the timeout",
                        access.request_timeout
                    ),
                );
            }
        };
        self.judge_answer(resp.status(), &admission);
        let (mut parts, incoming) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // Time to first token means something for streams only: a whole JSON body's first byte
        // comes when generation is over.
        let streaming =
            parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let (series, ttft, done_admission) =
            (self.series.clone(), self.series.time_to_first_token.clone(), admission.clone());
        let code = self.series.code(parts.status.as_u16());
        code.requests.inc();
        let tap = TapBody::new(
            incoming,
            started,
            Some(permit),
            move |first| {
                if streaming {
                    ttft.observe(first.as_secs_f64());
                }
            },
            move |outcome| {
                code.duration.observe(outcome.duration.as_secs_f64());
                let per_token = outcome.timings.and_then(|t| t.decode_per_token());
                done_admission.observe_response(outcome.duration, outcome.complete, per_token);
                if let Some(t) = outcome.timings {
                    series.generated_tokens.inc_by(t.predicted_n);
                }
            },
        );
        let tap = if streaming {
            let (stalls, pulse_now, stalled) =
                (self.series.stream_stalls.clone(), self.pulse_now.clone(), admission.clone());
            tap.watch_stalls(StallWatch::new(access.stream_stall_timeout, move || {
                stalls.inc();
                stalled.observe_stall();
                pulse_now.notify_one();
            }))
        } else {
            tap
        };
        Response::from_parts(parts, Either::Right(tap))
    }

    /// What an engine's answer to a client says about the engine. A success or a client error
    /// says it works. A server error may be the request's own doing (llama-server answers 500 to
    /// some well-formed JSON it cannot use), so it only makes the supervisor check the engine
    /// with a pulse; 501 (a feature the engine was not started with) says nothing at all.
    pub(super) fn judge_answer(&self, status: StatusCode, admission: &Admission) {
        if status.is_server_error() {
            if status != StatusCode::NOT_IMPLEMENTED {
                self.pulse_now.notify_one();
            }
        } else {
            admission.upstream_succeeded();
        }
    }

    pub(super) async fn wait_for_upstream(&self, within: Duration) -> Option<u16> {
        let mut rx = self.upstream.clone();
        match tokio::time::timeout(within, rx.wait_for(|u| u.port.is_some() || u.failed())).await {
            Ok(Some(u)) => u.port,
            _ => None,
        }
    }

    pub(super) async fn forward_cheap(
        &self,
        req: Request<Incoming>,
        port: u16,
        started: Instant,
        access: &Access,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let Ok(Ok(body)) =
            tokio::time::timeout(self.timeouts.body, Limited::new(body, CHEAP_BODY_BYTES).collect()).await
        else {
            return client_error(StatusCode::BAD_REQUEST, "bad_body", "could not read the request body");
        };
        let body = body.to_bytes();
        // Cheap paths may have no body at all (GET /v1/models); a body they have is JSON.
        let shape = if body.is_empty() {
            BodyShape::default()
        } else {
            match json_shape(&parts, &body) {
                Ok(shape) => shape,
                Err(mistake) => return mistake.response(),
            }
        };
        let upstream_req = match engine_request(&parts, port, body, access, shape) {
            Ok(r) => r,
            Err(mistake) => return mistake.response(),
        };
        let left = access.request_timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, self.client.request(upstream_req)).await {
            Ok(Ok(resp)) => {
                self.judge_answer(resp.status(), &self.admission());
                let (mut parts, incoming) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let code = self.series.code(parts.status.as_u16());
                code.requests.inc();
                let done = move |outcome: crate::serving::tap::TapOutcome| {
                    code.duration.observe(outcome.duration.as_secs_f64())
                };
                Response::from_parts(parts, Either::Right(TapBody::new(incoming, started, None, |_| {}, done)))
            }
            Ok(Err(_)) => {
                self.admission().upstream_failed();
                self.pulse_now.notify_one();
                self.refuse(&self.admission(), Rejection::NotReady)
            }
            Err(_) => {
                self.series.request_stalls.inc();
                self.pulse_now.notify_one();
                server_error(StatusCode::GATEWAY_TIMEOUT, "request_timeout", "the engine did not answer in time")
            }
        }
    }
}

/// A request the client got wrong: answered 400 with what was wrong.
struct ClientMistake {
    code: &'static str,
    message: String,
}

impl ClientMistake {
    fn response(self) -> Response<ProxyBody> {
        client_error(StatusCode::BAD_REQUEST, self.code, &self.message)
    }
}

/// What the proxy needs of a JSON body.
fn json_shape(parts: &http::request::Parts, body: &[u8]) -> Result<BodyShape, ClientMistake> {
    check_json_body(&parts.headers, body)
        .map_err(|problem| ClientMistake { code: "invalid_json", message: problem.to_string() })
}

/// The request the engine gets for the client's (the API key stripped when the agent checked
/// it).
fn engine_request(
    parts: &http::request::Parts,
    port: u16,
    body: Bytes,
    access: &Access,
    shape: BodyShape,
) -> Result<Request<Full<Bytes>>, ClientMistake> {
    let keyed = !access.api_keys.is_open();
    build_upstream(&parts.method, parts.uri.path_and_query(), &parts.headers, port, body, keyed, shape)
        .map_err(|e| ClientMistake { code: "bad_request", message: format!("bad request line: {e}") })
}
