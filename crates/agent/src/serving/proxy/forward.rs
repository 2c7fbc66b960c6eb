//! Forwarding to the engine: inference through the admission queue (waiting for a place, the
//! engine's answer judged for the breaker, streams tapped for timings and stalls), and cheap
//! paths straight through.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use metalkube_api::Rejection;

use super::{Access, CHEAP_BODY_BYTES, CHEAP_RESPONSE_BYTES, ModelProxy};
use crate::serving::in_engine::InEngineRequest;
use crate::serving::in_engine::digest;
use crate::serving::inspect::{RequestRefusal, RequestShape, inspect};
use crate::serving::queue::Admission;
use crate::serving::request_shape::{build_upstream, strip_hop_by_hop};
use crate::serving::responses::{ProxyBody, client_error, error_response, server_error};
use crate::serving::tap::{StallWatch, TapBody};

impl ModelProxy {
    /// A body the port will not pass: 400 naming the field, what was wrong and what is allowed.
    fn refuse_input(&self, admission: &Admission, refusal: &RequestRefusal) -> Response<ProxyBody> {
        admission.rejected(Rejection::InvalidInput);
        client_error(StatusCode::BAD_REQUEST, refusal.client_code(), &refusal.to_string())
    }

    pub(super) async fn inference(
        &self,
        req: Request<Incoming>,
        peer: std::net::SocketAddr,
        started: Instant,
        access: &Access,
    ) -> Response<ProxyBody> {
        let admission = self.admission();
        let (parts, body) = req.into_parts();
        // The whole body is read before a place is taken, so a slow uploader never holds one.
        let (body, reservation) =
            match self.read_body(&parts, body, peer, admission.limits().max_request_bytes, &admission).await {
                Ok(read) => read,
                Err(refused) => return *refused,
            };
        let shape = match inspect(parts.uri.path(), &body, admission.limits().max_concurrent) {
            Ok(shape) => shape,
            Err(refusal) => return self.refuse_input(&admission, &refusal),
        };
        let body_digest = digest(&body);
        if metalkube_runtime::sync::lock(&self.quarantine).refuses(&body_digest, Instant::now()) {
            admission.rejected(Rejection::InvalidInput);
            return client_error(
                StatusCode::BAD_REQUEST,
                "quarantined_request",
                "this exact request was in the engine when it crashed; the serving port refuses it for an hour (change the request, or ask the operator to look at the engine's log)",
            );
        }

        let permit = match admission.admit(self.upstream().is_some(), shape.engine_tasks).await {
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

        let mut in_engine = self.in_engine.enter(InEngineRequest {
            client: peer,
            request: format!("{} {}", parts.method, parts.uri.path()),
            body: body_digest,
            since: Instant::now(),
        });
        let upstream_req = match engine_request(&parts, port, body, access, shape) {
            Ok(r) => r,
            Err(mistake) => return mistake.response(),
        };
        let left = access.request_timeout.saturating_sub(started.elapsed());
        let answered = tokio::time::timeout(left, self.client.request(upstream_req)).await;
        // The engine has read the body once it answers (or the request is over): its memory
        // goes back to the port.
        drop(reservation);
        let resp = match answered {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                // The engine did not answer at all: that is the engine's, whoever asked. If it
                // died of this request, the supervisor sees the exit a moment later: the request
                // stays a suspect.
                in_engine.broke_off();
                admission.upstream_failed();
                self.pulse_now.notify_one();
                tracing::warn!("engine unreachable: {}", metalkube_runtime::errors::chain(&e));
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
        let tap = tap.in_engine(in_engine);
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
        peer: std::net::SocketAddr,
        port: u16,
        started: Instant,
        access: &Access,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let admission = self.admission();
        let (body, reservation) = match self.read_body(&parts, body, peer, CHEAP_BODY_BYTES, &admission).await {
            Ok(read) => read,
            Err(refused) => return *refused,
        };
        // Cheap paths may have no body at all (GET /v1/models); a body they have is JSON.
        let shape = if body.is_empty() {
            RequestShape::default()
        } else {
            match inspect(parts.uri.path(), &body, admission.limits().max_concurrent) {
                Ok(shape) => shape,
                Err(refusal) => return self.refuse_input(&admission, &refusal),
            }
        };
        let upstream_req = match engine_request(&parts, port, body, access, shape) {
            Ok(r) => r,
            Err(mistake) => return mistake.response(),
        };
        // Cheap is per request, not in sum: a 1 MiB /tokenize costs the engine most of a second
        // of CPU, and eight clients flooding it slowed everyone's inference eightfold. One at a
        // time per model (`CHEAP_CONCURRENCY`); the rest wait their turn within the queue timeout.
        let Ok(Ok(_turn)) =
            tokio::time::timeout(admission.limits().queue_timeout, self.cheap_turns.clone().acquire_owned()).await
        else {
            // Counted, but not as the model being busy: inference places may all be free.
            self.series.rejected(Rejection::QueueTimeout);
            let retry = admission.retry_after(Rejection::QueueTimeout, self.not_ready_for());
            return error_response(
                Rejection::QueueTimeout,
                &format!(
                    "model {}: requests that do no generation (tokenize, templates) run one at a time, and the one before yours did not finish within the queue timeout {:?}",
                    self.model,
                    admission.limits().queue_timeout
                ),
                Some(retry),
            );
        };
        let left = access.request_timeout.saturating_sub(started.elapsed());
        let answered = tokio::time::timeout(left, async {
            let resp = self.client.request(upstream_req).await.map_err(|_| CheapFailure::Engine)?;
            let (parts, incoming) = resp.into_parts();
            let body = Limited::new(incoming, CHEAP_RESPONSE_BYTES).collect().await.map_err(CheapFailure::Body)?;
            Ok::<_, CheapFailure>((parts, body.to_bytes()))
        })
        .await;
        drop(reservation);
        match answered {
            Ok(Ok((mut head, body))) => {
                self.judge_answer(head.status, &admission);
                strip_hop_by_hop(&mut head.headers);
                let body = if parts.method == http::Method::GET && parts.uri.path() == "/props" {
                    head.headers.remove(header::CONTENT_LENGTH);
                    client_props(&body)
                } else if parts.method == http::Method::GET
                    && parts.uri.path() == "/metrics"
                    && head.status == StatusCode::OK
                {
                    head.headers.remove(header::CONTENT_LENGTH);
                    self.with_load_gauges(&body)
                } else {
                    body
                };
                Response::from_parts(head, Either::Left(Full::new(body)))
            }
            Ok(Err(CheapFailure::Body(e))) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                server_error(
                    StatusCode::BAD_GATEWAY,
                    "response_too_large",
                    &format!(
                        "the engine's answer to {} is larger than {CHEAP_RESPONSE_BYTES} bytes, the most the serving port passes on this path; send less text at once (or ask /tokenize without with_pieces)",
                        parts.uri.path()
                    ),
                )
            }
            Ok(Err(_)) => {
                admission.upstream_failed();
                self.pulse_now.notify_one();
                self.refuse(&admission, Rejection::NotReady)
            }
            Err(_) => {
                self.series.request_stalls.inc();
                self.pulse_now.notify_one();
                server_error(StatusCode::GATEWAY_TIMEOUT, "request_timeout", "the engine did not answer in time")
            }
        }
    }
}

/// Why a cheap path's answer did not come back whole.
enum CheapFailure {
    /// The engine did not answer.
    Engine,
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// What clients get of the engine's `GET /props`: the settings a client needs (its context
/// size, slots, chat template, modalities, generation defaults), not where the model file lives
/// on this Mac nor how the engine was built. An answer that is not a JSON object passes as it
/// is (an error from the engine).
fn client_props(body: &Bytes) -> Bytes {
    const KEPT: [&str; 9] = [
        "default_generation_settings",
        "model_alias",
        "total_slots",
        "chat_template",
        "chat_template_caps",
        "modalities",
        "bos_token",
        "eos_token",
        "is_sleeping",
    ];
    let Ok(serde_json::Value::Object(mut props)) = serde_json::from_slice::<serde_json::Value>(body) else {
        return body.clone();
    };
    props.retain(|k, _| KEPT.contains(&k.as_str()));
    if let Some(serde_json::Value::Object(settings)) = props.get_mut("default_generation_settings") {
        // The settings name the model by its path.
        settings.remove("model");
        if let Some(serde_json::Value::Object(params)) = settings.get_mut("params") {
            params.remove("model");
        }
    }
    Bytes::from(serde_json::Value::Object(props).to_string())
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

/// The request the engine gets for the client's (the API key stripped when the agent checked
/// it).
fn engine_request(
    parts: &http::request::Parts,
    port: u16,
    body: Bytes,
    access: &Access,
    shape: RequestShape,
) -> Result<Request<Full<Bytes>>, ClientMistake> {
    let keyed = !access.api_keys.is_open();
    build_upstream(&parts.method, parts.uri.path_and_query(), &parts.headers, port, body, keyed, shape)
        .map_err(|e| ClientMistake { code: "bad_request", message: format!("bad request line: {e}") })
}
