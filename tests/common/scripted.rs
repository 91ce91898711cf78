//! Scripted failures for the mock provider APIs: answers to play instead of
//! the real thing, per HTTP method, in order.

use std::collections::VecDeque;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// A status, with a `Retry-After` in seconds.
pub type Failure = (u16, Option<u32>);

#[derive(Default)]
pub struct Failures(Vec<(&'static str, VecDeque<Failure>)>);

impl Failures {
    /// Queues `status` for the next `method` request.
    pub fn push(&mut self, method: &'static str, status: u16, retry_after: Option<u32>) {
        match self.0.iter_mut().find(|(k, _)| *k == method) {
            Some((_, queue)) => queue.push_back((status, retry_after)),
            None => self
                .0
                .push((method, VecDeque::from([(status, retry_after)]))),
        }
    }

    /// The queued answer for a `method` request, if any.
    pub fn take(&mut self, method: &str) -> Option<Response> {
        let (status, retry_after) = self
            .0
            .iter_mut()
            .find(|(k, _)| *k == method)
            .and_then(|(_, queue)| queue.pop_front())?;
        let status = StatusCode::from_u16(status).expect("valid status");
        Some(match retry_after {
            Some(secs) => (status, [("retry-after", secs.to_string())]).into_response(),
            None => status.into_response(),
        })
    }
}
