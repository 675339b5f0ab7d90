-- The sampled answers of one iteration with their grades.
-- Grain: one row per rollout. Used as a view by candidates.sql and advantages.sql.
-- Inputs: rollouts, rewards.
with

final as (
    select
        r.rollout_id,
        r.prompt_id,
        r.sample_index,
        r.prompt_token_ids,
        r.response_token_ids,
        r.logprobs,
        r.temperature,
        w.reward,
        w.items_met
    from rollouts as r
    join rewards as w using (rollout_id)
)

select * from final
