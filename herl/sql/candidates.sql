-- Hindsight candidates (docs/algorithm.md step 3).
-- Grain: one row per candidate rollout (a best-reward answer of a failed group).
-- A group fails when its best reward is below $threshold; from it we take the answers
-- whose reward ties the group's best (within $tie_tolerance, the reference's 1e-6),
-- preferring more items met, then sample order, at most $candidate_limit per group.
-- Rewards and items met are the ones HeRL chooses by (originals.sql: a looping answer
-- counts 0 under the repetition rule).
-- Inputs: rollouts, rewards.
-- Parameters: $threshold, $candidate_limit, $skip_looping, $tie_tolerance.
with

originals_in as (
    select * from originals($skip_looping)  -- originals.sql
),

failed as (
    select * from failed_groups($threshold, $skip_looping)  -- groups.sql
),

ranked as (
    select
        o.rollout_id,
        o.prompt_id,
        o.sample_index,
        o.reward,
        o.choice_reward,
        o.items_met,
        o.looped,
        f.best_reward,
        row_number() over (
            partition by o.prompt_id
            order by o.choice_items_met desc, o.sample_index
        ) as candidate_rank
    from originals_in as o
    join failed as f using (prompt_id)
    -- the reference: abs(score - best) < 1e-6; equality too, so a tolerance of 0 is exact
    where o.choice_reward = f.best_reward or abs(o.choice_reward - f.best_reward) < $tie_tolerance
),

final as (
    select * from ranked where candidate_rank <= $candidate_limit
)

select * from final
order by prompt_id, candidate_rank
