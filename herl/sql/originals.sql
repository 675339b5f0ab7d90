-- The sampled answers of one iteration with their grades, and what HeRL's choices read.
-- Grain: one row per rollout (ids and numbers only: the token lists stay in rollouts).
-- A table macro used by groups.sql, candidates.sql and
-- advantages.sql:  select * from originals(skip_looping)
-- Inputs: rollouts, rewards.  Parameter: skip_looping (hindsight.skip_looping).
-- choice_reward / choice_items_met are what candidates, the group's best and fallback
-- copies are chosen by: the reward and items met, or 0 and 0 for an answer that loops when
-- the repetition rule is on (the reference's `dense` score, 0 for a looping answer, and
-- its empty is_following_list). Training uses `reward` whatever the rule says.
with

rollouts_in as (
    select rollout_id, prompt_id, sample_index, temperature
    from rollouts
),

rewards_in as (
    select rollout_id, reward, items_met, coalesce(looped, false) as looped from rewards
),

final as (
    select
        r.*,
        w.reward,
        w.items_met,
        w.looped,
        case when skip_looping and w.looped then 0.0 else w.reward end as choice_reward,
        case when skip_looping and w.looped then 0 else w.items_met end as choice_items_met
    from rollouts_in as r
    join rewards_in as w using (rollout_id)
)

select * from final
