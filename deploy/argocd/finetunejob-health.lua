-- Argo CD health check for finetune.dev/FineTuneJob.
-- Argo CD runs it with the live object as `obj` and reads back {status, message}; as an
-- argocd-cm override it gets only Lua's base, package and table libraries (no string or
-- math; Argo CD adds a restricted os, unused here). tests/unit/deploy/test_deploy_argocd.py
-- runs it that way (gopher-lua, hack/gotools) over every case in health_test.yaml.
--   no status, or a generation the operator has not observed yet -> Progressing
--   Pending, Running                                              -> Progressing (stage, epoch, percent)
--   Succeeded                                                     -> Healthy
--   Failed                                                        -> Degraded (with the failure reason)
--   Suspended                                                     -> Suspended
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
  if message == "" then
    hs.message = reason
  else
    hs.message = reason .. ": " .. message
  end
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = status.message or "Job is suspended"
  return hs
end
if suspended ~= nil and suspended.status == "True" then
  hs.status = "Suspended"
  if suspended.message ~= nil and suspended.message ~= "" then
    hs.message = suspended.message
  else
    hs.message = "Job is suspended"
  end
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
