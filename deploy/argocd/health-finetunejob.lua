-- Argo CD resource health for kubetune.io/FineTuneJob.
-- Install under argocd-cm: resource.customizations.health.kubetune.io_FineTuneJob (see docs/operations/gitops.md).
hs = {}
local phase = nil
local message = nil
if obj.status ~= nil then
  phase = obj.status.phase
  message = obj.status.message
end
if phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator"
  return hs
end
-- An edit the operator has not acted on yet: the status still describes the previous spec.
if obj.metadata ~= nil and obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to act on generation " .. obj.metadata.generation
  return hs
end
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
else
  -- Pending, Initializing, Running, Restarting
  hs.status = "Progressing"
end
if message ~= nil and message ~= "" then
  hs.message = phase .. ": " .. message
else
  hs.message = phase
end
return hs
