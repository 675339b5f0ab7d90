-- Hindsight candidates (docs/algorithm.md step 3).
-- Grain: one row per candidate rollout (a best-reward answer of a failed group).
-- A group fails when its best reward is below $threshold; from it we take the answers
-- whose reward equals the group's best, preferring more items met, at most
-- $candidate_limit per group.
-- Inputs: originals (originals.sql over this iteration's rollouts and rewards), rewards.  Parameters: $threshold, $candidate_limit.
with

failed as (
    select * from failed_groups($threshold)  -- groups.sql
),

ranked as (
    select
        o.rollout_id,
        o.prompt_id,
        o.sample_index,
        o.reward,
        o.items_met,
        f.best_reward,
        row_number() over (
            partition by o.prompt_id
            order by o.items_met desc, o.sample_index
        ) as candidate_rank
    from originals as o
    join failed as f using (prompt_id)
    where o.reward = f.best_reward
),

final as (
    select * from ranked where candidate_rank <= $candidate_limit
)

select * from final
order by prompt_id, candidate_rank
