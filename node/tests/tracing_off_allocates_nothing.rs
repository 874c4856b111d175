//! With tracing off (no OTLP endpoint), a message's ingress costs no
//! tracing allocation: counted by a global allocator around the ingress of a
//! client's message (with and without a publisher's `traceparent`) and every
//! hop's span.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use node::shard::Publish;
use node::telemetry::{self, Hop};
use protocol::{Data, Topic, TraceParent};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call goes straight to the system allocator; the counters are
// const-initialised thread locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations `work` makes on this thread.
fn allocations(work: impl FnOnce()) -> usize {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    work();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn a_message_costs_no_tracing_allocation_when_tracing_is_off() {
    assert!(!telemetry::enabled());
    let topic = Topic::parse("news.eu").expect("topic");
    let parent =
        TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("tp");
    // The message itself (topic, data) is built outside the count; metrics
    // are initialised by a first message.
    drop(Publish::from_client(
        topic.clone(),
        Data::null(),
        None,
        None,
        None,
    ));

    for trace in [None, Some(parent)] {
        let (topic, data) = (topic.clone(), Data::null());
        let counted = allocations(|| {
            let (publish, ingress) = Publish::from_client(topic, data, trace, None, None);
            assert_eq!(
                publish.trace, trace,
                "the publisher's context passes through"
            );
            assert!(ingress.traceparent().is_none());
            for hop in [Hop::Sequence, Hop::Deliver] {
                let span = telemetry::message_span(hop, trace.as_ref(), None, "news.eu");
                span.record_seq(1);
                assert!(span.traceparent().is_none() && span.span().is_none());
            }
        });
        assert_eq!(counted, 0, "allocations with trace {trace:?}");
    }
}
