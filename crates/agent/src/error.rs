//! Errors as logs and reports tell them: one line with every cause. (Each concern's error enum
//! lives in the stage that raises it; `agent_error` puts them together for callers of several.)

/// An error with its causes, "outer: inner: innermost", for logs: the outer message alone often
/// hides what went wrong (hyper's "client error (SendRequest)" says nothing about why).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
