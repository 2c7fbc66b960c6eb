//! Reading a request body whole, within the port's limits: its size (`maxRequestBytes`), its
//! time (the body timeout), and the memory all bodies share (`body_budget`).

use bytes::Bytes;
use bytes::BytesMut;
use http::{Response, StatusCode, header};
use http_body::Body as _;
use hyper::body::Incoming;
use metalkube_api::Rejection;

use super::ModelProxy;
use crate::serving::body_budget::Reservation;
use crate::serving::queue::Admission;
use crate::serving::responses::{ProxyBody, client_error, error_response};

impl ModelProxy {
    /// The body of `parts`' request, with the memory it holds; or the answer that refuses it.
    pub(super) async fn read_body(
        &self,
        parts: &http::request::Parts,
        body: Incoming,
        peer: std::net::SocketAddr,
        limit: u64,
        admission: &Admission,
    ) -> Result<(Bytes, Reservation), Box<Response<ProxyBody>>> {
        let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(Box::new(self.too_large(admission, limit)));
        }
        // A declared length that does not fit is refused now, not after megabytes were sent;
        // one that fits reserves its bytes as they come.
        if let Some(n) = declared
            && !self.bodies.has_room(peer.ip(), n)
        {
            return Err(Box::new(self.refuse(admission, admission.rejected(Rejection::BodyMemory))));
        }
        let mut reservation = self.bodies.reservation(peer.ip());
        let capacity = usize::try_from(declared.unwrap_or(0)).unwrap_or(0);
        let read = collect(body, limit, &mut reservation, capacity);
        match tokio::time::timeout(self.timeouts.body, read).await {
            Ok(Ok(bytes)) => Ok((bytes, reservation)),
            Ok(Err(refusal)) => Err(Box::new(match refusal {
                Some(Rejection::TooLarge) => self.too_large(admission, limit),
                Some(r) => self.refuse(admission, admission.rejected(r)),
                None => client_error(StatusCode::BAD_REQUEST, "bad_body", "could not read the request body"),
            })),
            Err(_) => Err(Box::new(self.refuse(admission, admission.rejected(Rejection::RequestTimeout)))),
        }
    }
}

impl ModelProxy {
    /// 413 naming the limit of this path: `maxRequestBytes` for inference, the port's own bound
    /// for paths that do no generation.
    fn too_large(&self, admission: &Admission, limit: u64) -> Response<ProxyBody> {
        admission.rejected(Rejection::TooLarge);
        let which = if limit == admission.limits().max_request_bytes {
            format!("spec.admission.maxRequestBytes ({limit} bytes)")
        } else {
            format!("{limit} bytes, the most a path that does no generation takes")
        };
        error_response(Rejection::TooLarge, &format!("the request body is larger than {which}"), None)
    }
}

/// Gathers the body's frames, growing the reservation before each is kept. `Err(Some(_))`:
/// refused for size or memory; `Err(None)`: the client's stream broke.
async fn collect(
    mut body: Incoming,
    limit: u64,
    reservation: &mut Reservation,
    capacity: usize,
) -> Result<Bytes, Option<Rejection>> {
    let mut buf = BytesMut::with_capacity(capacity);
    while let Some(frame) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|_| None)?;
        let Ok(data) = frame.into_data() else { continue };
        let total = buf.len() as u64 + data.len() as u64;
        if total > limit {
            return Err(Some(Rejection::TooLarge));
        }
        if !reservation.grow_to(total) {
            return Err(Some(Rejection::BodyMemory));
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}
