/// Calls `$callback!(…)` with the name of every scenario of [`scenarios`](crate::scenarios):
/// the one list from which [`scenarios::ALL`](crate::scenarios::ALL) and [`conformance!`] are
/// both made, so a scenario added here reaches every provider. (A unit test of the testkit
/// checks that every `pub async fn` of `scenarios.rs` is on it.)
///
/// Extra tokens before the callback's arguments go first: `for_each_scenario!(cb, $x)` expands
/// to `cb!($x; a, b, …)`.
#[macro_export]
macro_rules! for_each_scenario {
    (@list $callback:path [$($extra:tt)*]) => {
        $callback! { $($extra)*
            a_job_runs_exactly_once,
            batch_enqueue_runs_every_job,
            a_delayed_job_waits_until_due,
            a_run_at_in_the_past_runs_now,
            higher_priority_runs_first,
            equal_priority_runs_in_run_at_order,
            queues_are_isolated,
            many_queues_are_all_served,
            a_retryable_failure_is_retried_with_backoff,
            exhausted_attempts_end_dead_with_the_last_error,
            a_fatal_error_ends_dead_at_once,
            a_panic_is_a_retryable_failure,
            retry_after_reschedules_without_escalation,
            undecodable_arguments_end_dead_with_the_reason,
            an_unknown_job_name_is_never_lost,
            lease_expiry_redelivers_the_job,
            a_stale_token_cannot_complete_or_fail_a_job,
            a_heartbeat_keeps_a_long_job_leased,
            a_timeout_cancels_the_attempt,
            a_job_that_never_finishes_ends_dead_after_max_attempts,
            max_age_abandons_a_job,
            shutdown_lets_running_jobs_finish_and_leaves_queued_jobs_untouched,
            shutdown_cancels_running_jobs_after_the_grace_period_and_hands_them_back,
            the_concurrency_limit_holds,
            a_new_job_wakes_an_idle_server,
            enqueue_with_an_existing_id_is_idempotent,
            an_oversized_payload_is_refused,
            inspection_lists_and_counts_by_state,
            an_operator_can_retry_or_delete_a_dead_job_and_cancel_a_queued_one,
            retention_prunes_succeeded_and_dead_jobs,
            the_lock_is_exclusive_renewable_and_expires,
            a_singleton_worker_runs_on_one_manager_at_a_time,
            two_servers_never_run_a_job_twice,
            shared_state_reaches_handlers
        }
    };
    ($callback:path) => {
        $crate::for_each_scenario! { @list $callback [] }
    };
    ($callback:path, $($extra:tt)*) => {
        $crate::for_each_scenario! { @list $callback [$($extra)*] }
    };
}

/// Expands the whole conformance suite into one `#[tokio::test]` per scenario.
///
/// Takes an expression that builds a [`Harness`](crate::Harness); it is built once per test.
#[macro_export]
macro_rules! conformance {
    ($harness:expr) => {
        $crate::for_each_scenario! { $crate::__conformance_tests, $harness; }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $harness;
                $crate::scenarios::$name(&harness).await;
            }
        )*
    };
}
