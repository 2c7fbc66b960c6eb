//! One message of an agent's `Watch` stream, read into the api crate's terms (`AgentEvent`). The
//! controller and the router both follow agents' streams; what a message means is decided here,
//! once.

use metalkube_api::{AgentEvent, ModelKey, ReplicaReport};

use crate::report::WireError;
use crate::{WatchEvent, watch_event};

/// What a Watch message said: its event, when anything in it can be read, and what could not be
/// (for the reader to log: one bad report must not cost an agent its stream, and a snapshot's
/// readable reports stand without its unreadable ones).
#[derive(Debug, Default)]
pub struct ReadEvent {
    pub event: Option<AgentEvent>,
    pub unreadable: Vec<WireError>,
}

impl From<WatchEvent> for ReadEvent {
    fn from(message: WatchEvent) -> Self {
        let mut unreadable = Vec::new();
        let event = match message.event {
            None => None,
            Some(watch_event::Event::Snapshot(snapshot)) => Some(AgentEvent::Snapshot(
                snapshot
                    .models
                    .into_iter()
                    .filter_map(|s| ReplicaReport::try_from(s).map_err(|e| unreadable.push(e)).ok())
                    .collect(),
            )),
            Some(watch_event::Event::Changed(state)) => ReplicaReport::try_from(state)
                .map(|r| AgentEvent::Changed(Box::new(r)))
                .map_err(|e| unreadable.push(e))
                .ok(),
            Some(watch_event::Event::Removed(model)) => {
                ModelKey::try_from(model).map(AgentEvent::Removed).map_err(|e| unreadable.push(e)).ok()
            }
        };
        Self { event, unreadable }
    }
}

#[cfg(test)]
mod tests {
    use metalkube_api::Phase;

    use super::*;
    use crate::{ModelRef, ModelState, Snapshot};

    fn event(e: watch_event::Event) -> WatchEvent {
        WatchEvent { event: Some(e) }
    }

    fn state(namespace: &str, name: &str) -> ModelState {
        let mut s = ModelState {
            model: Some(ModelRef { namespace: namespace.into(), name: name.into() }),
            ..Default::default()
        };
        s.set_model_phase(Phase::Serving);
        s
    }

    #[test]
    fn watch_events_are_read_and_what_cannot_be_is_left_out_and_told() {
        let key = ModelKey::new("ns", "a");
        let serving = ReplicaReport { phase: Some(Phase::Serving), ..ReplicaReport::new(key.clone()) };
        let snapshot = Snapshot { models: vec![state("ns", "a"), state("", "nameless"), ModelState::default()] };
        let read = ReadEvent::from(event(watch_event::Event::Snapshot(snapshot)));
        assert_eq!(read.event, Some(AgentEvent::Snapshot(vec![serving.clone()])), "the readable reports stand");
        assert_eq!(read.unreadable.len(), 2, "and the two that cannot be read are told");
        let read = ReadEvent::from(event(watch_event::Event::Changed(state("ns", "a"))));
        assert_eq!(read.event, Some(AgentEvent::Changed(Box::new(serving))));
        let read = ReadEvent::from(event(watch_event::Event::Changed(state("ns/x", "a"))));
        assert_eq!((read.event, read.unreadable.len()), (None, 1));
        let removed = ModelRef { namespace: "ns".into(), name: "a".into() };
        let read = ReadEvent::from(event(watch_event::Event::Removed(removed)));
        assert_eq!(read.event, Some(AgentEvent::Removed(key)));
        let read = ReadEvent::from(WatchEvent { event: None });
        assert!(read.event.is_none() && read.unreadable.is_empty(), "an empty event changes nothing");
    }
}
