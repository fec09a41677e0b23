-- Argo CD health check for finetune.dev/FineTuneJob.
-- Argo CD runs it with the live object as `obj` and reads back {status, message}.
--   generation not yet observed by the operator -> Progressing
--   Pending, Running                             -> Progressing (with stage, epoch, percent)
--   Succeeded                                    -> Healthy
--   Failed                                       -> Degraded (with the failure reason)
--   Suspended                                    -> Suspended
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the job"
  return hs
end

local status = obj.status
local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
local suspended = condition(status, "Suspended")
if phase == "Succeeded" then
  hs.status = "Healthy"
  if status.modelPath ~= nil then
    hs.message = "Model saved to " .. status.modelPath
  else
    hs.message = status.message or "Training succeeded"
  end
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  local failed = condition(status, "Failed")
  local reason = status.reason or (failed ~= nil and failed.reason) or "Failed"
  local message = status.message or (failed ~= nil and failed.message) or ""
  hs.message = reason .. ": " .. message
  return hs
end

if phase == "Suspended" or (suspended ~= nil and suspended.status == "True") then
  hs.status = "Suspended"
  hs.message = status.message or "Job is suspended"
  return hs
end

hs.status = "Progressing"
if phase == "Running" and status.stage ~= nil then
  local text = status.stage
  if status.epoch ~= nil then
    text = text .. " epoch " .. tostring(status.epoch)
  end
  if status.progress ~= nil then
    text = text .. ", " .. tostring(status.progress) .. "%"
  end
  hs.message = text
else
  hs.message = status.message or ("Job is " .. (phase or "waiting for the operator"))
end
return hs
