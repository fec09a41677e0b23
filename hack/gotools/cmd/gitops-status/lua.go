package main

// The Argo CD health Lua, run the way Argo CD runs an argocd-cm override
// (`resource.customizations.health.<group>_<kind>`, util/lua in argoproj/argo-cd):
//
//   - gopher-lua with the standard libraries skipped, then only `package`, the base
//     library and `table` opened (overrides get the full set only with
//     `resource.customizations.useOpenLibs.<group>_<kind>: "true"`, which we do not ship).
//     Argo CD also adds a restricted `os` (time and date only); this runner leaves it out,
//     so a script that passes here cannot depend on it. No `string`, `math`, `io`, `debug`;
//   - a one-second deadline on the run;
//   - an object with a deletionTimestamp never reaches the Lua: Argo CD reads it as
//     Progressing "Pending deletion" (argoResourceHealth);
//   - the live object bound to the global `obj`, maps as tables, lists as array tables,
//     integers and floats as Lua numbers, null as nil;
//   - the chunk's returned table read back through JSON into {status, message}: a status
//     outside Argo CD's health codes reads Unknown "Lua returned an invalid health status",
//     a non-table return is an error.

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// HealthStatus is Argo CD's health.HealthStatus as the Lua's table decodes into it.
type HealthStatus struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
}

var argoHealthCodes = map[string]bool{
	"Unknown": true, "Progressing": true, "Suspended": true, "Healthy": true, "Degraded": true, "Missing": true,
}

const luaTimeout = time.Second

// argoResourceHealth is what Argo CD shows for obj with the Lua as its health override:
// an object being deleted is Progressing "Pending deletion" before any override runs
// (gitops-engine's health.GetResourceHealth); otherwise the Lua decides.
func argoResourceHealth(obj *unstructured.Unstructured, script string) (*HealthStatus, error) {
	if obj.GetDeletionTimestamp() != nil {
		return &HealthStatus{Status: "Progressing", Message: "Pending deletion"}, nil
	}
	return argoHealth(obj, script)
}

func argoHealth(obj *unstructured.Unstructured, script string) (*HealthStatus, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := L.CallByParam(lua.P{Fn: L.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return nil, fmt.Errorf("opening Lua library %q: %w", lib.name, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), luaTimeout)
	defer cancel()
	L.SetContext(ctx)
	L.SetGlobal("obj", toLua(L, obj.Object))
	if err := L.DoString(script); err != nil {
		return nil, err
	}
	ret := L.Get(-1)
	if ret.Type() != lua.LTTable {
		return nil, fmt.Errorf("expect table output from Lua script, not %s", ret.Type().String())
	}
	value, err := fromLua(ret, 0)
	if err != nil {
		return nil, err
	}
	data, err := json.Marshal(value)
	if err != nil {
		return nil, err
	}
	hs := &HealthStatus{}
	if err := json.Unmarshal(data, hs); err != nil {
		return nil, err
	}
	if !argoHealthCodes[hs.Status] {
		return &HealthStatus{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return hs, nil
}

// toLua converts a decoded Kubernetes object (unstructured content) into Lua values.
func toLua(L *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case int64:
		return lua.LNumber(v)
	case int32:
		return lua.LNumber(v)
	case int:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case json.Number:
		return lua.LString(v)
	case []any:
		tbl := L.CreateTable(len(v), 0)
		for _, item := range v {
			tbl.Append(toLua(L, item))
		}
		return tbl
	case map[string]any:
		tbl := L.CreateTable(0, len(v))
		for key, item := range v {
			tbl.RawSetH(lua.LString(key), toLua(L, item))
		}
		return tbl
	}
	return lua.LNil
}

const maxLuaDepth = 64

// fromLua converts a returned Lua value to JSON-encodable Go values: a table with only
// 1..n keys is an array (an empty table too), otherwise an object with string keys.
func fromLua(value lua.LValue, depth int) (any, error) {
	if depth > maxLuaDepth {
		return nil, fmt.Errorf("the Lua result nests deeper than %d tables", maxLuaDepth)
	}
	switch v := value.(type) {
	case *lua.LNilType:
		return nil, nil
	case lua.LBool:
		return bool(v), nil
	case lua.LNumber:
		return float64(v), nil
	case lua.LString:
		return string(v), nil
	case *lua.LTable:
		n := v.MaxN()
		var mapped map[string]any
		var err error
		count := 0
		v.ForEach(func(key, item lua.LValue) {
			count++
			if err != nil || n > 0 {
				return
			}
			name, ok := key.(lua.LString)
			if !ok {
				err = fmt.Errorf("the Lua result has a table key of type %s", key.Type().String())
				return
			}
			if mapped == nil {
				mapped = map[string]any{}
			}
			mapped[string(name)], err = fromLua(item, depth+1)
		})
		if err != nil {
			return nil, err
		}
		if n > 0 {
			if count != n {
				return nil, fmt.Errorf("the Lua result mixes array and map entries in one table")
			}
			list := make([]any, 0, n)
			for i := 1; i <= n; i++ {
				item, err := fromLua(v.RawGetInt(i), depth+1)
				if err != nil {
					return nil, err
				}
				list = append(list, item)
			}
			return list, nil
		}
		if mapped == nil {
			return []any{}, nil
		}
		return mapped, nil
	}
	return nil, fmt.Errorf("the Lua result holds a %s, which has no JSON form", value.Type().String())
}
