//! The engine work one request makes. llama-server turns a request into one task per prompt
//! and per completion asked for (`prompt` as a list of prompts, `n`/`n_cmpl`), per embedding
//! input and per rerank document, and queues them all on its slots. One HTTP request of 20
//! prompts × 30 completions was 600 tasks: the pulse found no slot, the engine was restarted
//! for everyone as hung, and the request got its 200. Counting tasks lets the admission queue
//! give a request as many places as it takes engine slots.

use super::RequestRefusal;
use super::fields::Fields;

/// What kind of work a path asks of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// No generation (tokenizing, templates, settings).
    None,
    /// Text completion and infill: prompts × completions.
    Completion,
    /// Chat, responses, messages: one conversation × completions.
    Chat,
    /// One task per input.
    Embedding,
    /// One task per document.
    Rerank,
}

/// The tasks `fields` make for `work`, refused when more than `max` (the model's admission
/// limit) or when a count is not a whole number the engine can take.
pub fn count(work: Work, fields: &Fields<'_>, max: u32) -> Result<u32, RequestRefusal> {
    let max = max.max(1);
    let (tasks, how) = match work {
        Work::None => return Ok(1),
        Work::Completion => {
            let prompts = fields.prompts();
            let completions = completions(fields, max)?;
            (prompts.saturating_mul(completions.1), format!("{prompts} prompts × {} {}", completions.0, completions.1))
        }
        Work::Chat => {
            let completions = completions(fields, max)?;
            (completions.1, format!("{} {}", completions.0, completions.1))
        }
        Work::Embedding => {
            let inputs = fields.embedding_inputs();
            (inputs, format!("{inputs} inputs"))
        }
        Work::Rerank => {
            let documents = fields.documents();
            (documents, format!("{documents} documents"))
        }
    };
    if tasks > u64::from(max) {
        return Err(RequestRefusal::TooManyTasks { tasks, how, limit: max });
    }
    Ok(u32::try_from(tasks.max(1)).unwrap_or(max))
}

/// Completions asked for per prompt: the field that says so and its value (1 when absent).
fn completions(fields: &Fields<'_>, max: u32) -> Result<(&'static str, u64), RequestRefusal> {
    let mut asked = ("completions", 1u64);
    for (name, value) in [("n", &fields.n), ("n_cmpl", &fields.n_cmpl)] {
        let Some(value) = value else { continue };
        let whole = value.as_u64().filter(|n| *n >= 1).ok_or_else(|| RequestRefusal::Field {
            field: name.to_owned(),
            problem: format!("is {}", super::fields::describe(value)),
            allowed: format!("a whole number from 1 to {max} (the model's spec.admission.maxConcurrent)"),
        })?;
        if whole > asked.1 {
            asked = (name, whole);
        }
    }
    Ok(asked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(work: Work, body: &str, max: u32) -> Result<u32, RequestRefusal> {
        let fields: Fields<'_> = serde_json::from_str(body).unwrap();
        count(work, &fields, max)
    }

    #[test]
    fn prompts_times_completions() {
        assert_eq!(tasks(Work::Completion, r#"{"prompt": "hi"}"#, 4).unwrap(), 1);
        assert_eq!(tasks(Work::Completion, r#"{"prompt": ["a", "b"], "n_cmpl": 2}"#, 4).unwrap(), 4);
        // A list holding a number is one prompt of tokens (and strings), as the engine reads it.
        assert_eq!(tasks(Work::Completion, r#"{"prompt": [1, 2, 3, "x", 5]}"#, 4).unwrap(), 1);
        assert_eq!(tasks(Work::Completion, r#"{"prompt": [[1, 2], [3], "x"]}"#, 4).unwrap(), 3);
        assert_eq!(tasks(Work::Chat, r#"{"messages": [], "n": 3}"#, 4).unwrap(), 3);
        assert_eq!(tasks(Work::Embedding, r#"{"input": ["a", "b", "c"]}"#, 4).unwrap(), 3);
        assert_eq!(tasks(Work::Embedding, r#"{"content": "a"}"#, 4).unwrap(), 1);
        assert_eq!(tasks(Work::Rerank, r#"{"query": "q", "documents": ["a", "b"]}"#, 4).unwrap(), 2);
        assert_eq!(tasks(Work::None, r#"{"content": ["a", "b", "c", "d", "e"]}"#, 4).unwrap(), 1);
    }

    #[test]
    fn more_tasks_than_the_limit_are_refused_saying_how_they_were_counted() {
        let body = format!(r#"{{"prompt": [{}"x"], "n_cmpl": 30}}"#, "\"x\", ".repeat(19));
        let err = tasks(Work::Completion, &body, 4).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("600 engine tasks") && message.contains("20 prompts × n_cmpl 30"), "{message}");
        assert!(message.contains("at most 4"), "{message}");
    }

    #[test]
    fn completion_counts_must_be_whole_and_positive() {
        for bad in ["0", "-1", "1.5", "\"3\"", "1e300", "18446744073709551616"] {
            let err = tasks(Work::Chat, &format!(r#"{{"n": {bad}}}"#), 4).unwrap_err();
            assert!(err.to_string().contains("field `n`"), "{bad}: {err}");
        }
    }
}
