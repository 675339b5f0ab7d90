-- Failed groups (docs/algorithm.md step 3): a group fails when its best original reward,
-- as HeRL's choices read it (originals.sql's choice_reward), is below the threshold.
-- Grain: one row per failed prompt group, with its best reward.
-- A table macro (one definition for candidates.sql and advantages.sql):
--   select * from failed_groups($threshold, $skip_looping)
-- Inputs: originals(skip_looping).  Parameters: threshold, skip_looping.
with

groups as (
    select
        prompt_id,
        max(choice_reward) as best_reward
    from originals(skip_looping)
    group by prompt_id
),

final as (
    select * from groups where best_reward < threshold
)

select * from final
