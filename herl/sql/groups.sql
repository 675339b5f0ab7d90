-- Failed groups (docs/algorithm.md step 3): a group fails when its best original reward
-- is below the threshold.
-- Grain: one row per failed prompt group, with its best reward.
-- A table macro (one definition for candidates.sql and advantages.sql):
--   select * from failed_groups($threshold)
-- Inputs: rewards (one row per rollout of this iteration).  Parameter: threshold.
with

groups as (
    select
        prompt_id,
        max(reward) as best_reward
    from rewards
    group by prompt_id
),

final as (
    select * from groups where best_reward < threshold
)

select * from final
