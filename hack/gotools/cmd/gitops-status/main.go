// Command gitops-status says what GitOps tools conclude about Kubernetes objects, using
// their own code rather than a copy of their rules:
//
//   - kstatus: sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute, what Flux's health checks,
//     `kpt live status` and `kubectl wait`-style tools apply;
//   - Argo CD (with -lua FILE): a health check Lua run as Argo CD runs an argocd-cm
//     `resource.customizations.health.<group>_<kind>` override (see lua.go).
//
// Objects come from YAML or JSON documents (files, or stdin when none is named; a List's
// items count one by one), or from the API server with -kubeconfig, -gvk, -n and names.
// With -watch the one named object is watched and every version seen is classified (with
// the watch event and the time it arrived); "gitops-status: watching NAME" on stderr says
// the watch is open.
//
// Output: one JSON object a line, per object (or per watch event):
//
//	{"kind":"FineTuneJob","namespace":"ml","name":"flowers","generation":1,"observedGeneration":1,
//	 "resourceVersion":"42","event":"MODIFIED","seen":"2026-01-01T12:00:00.123Z",
//	 "kstatus":{"status":"InProgress","message":"..."},
//	 "argocd":{"status":"Progressing","message":"..."}}
//
// Exit status: 0 done; 1 bad usage, unreadable input or API error; 2 a Lua run failed (its
// line carries argocd.error); 3 -until was given and never seen before -watch ran out.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

// Verdict is one tool's conclusion about one object.
type Verdict struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message"`
	Error   string `json:"error,omitempty"`
}

// Line is what gitops-status prints for one object version.
type Line struct {
	Kind            string   `json:"kind"`
	Namespace       string   `json:"namespace,omitempty"`
	Name            string   `json:"name"`
	Generation      int64    `json:"generation"`
	Observed        *int64   `json:"observedGeneration,omitempty"`
	ResourceVersion string   `json:"resourceVersion,omitempty"`
	Event           string   `json:"event,omitempty"`
	Seen            string   `json:"seen,omitempty"`
	Kstatus         Verdict  `json:"kstatus"`
	ArgoCD          *Verdict `json:"argocd,omitempty"`
}

type options struct {
	lua        string
	kubeconfig string
	gvk        string
	namespace  string
	watch      time.Duration
	until      string
	args       []string
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(argv []string, stdin io.Reader, stdout, stderr io.Writer) int {
	opts, err := parseFlags(argv, stderr)
	if err != nil {
		return 1
	}
	var script string
	if opts.lua != "" {
		data, err := os.ReadFile(opts.lua)
		if err != nil {
			fmt.Fprintf(stderr, "gitops-status: %v\n", err)
			return 1
		}
		script = string(data)
	}
	out := &printer{enc: json.NewEncoder(stdout), script: script, withLua: opts.lua != "", until: opts.until}

	if opts.kubeconfig == "" {
		objs, err := readInputs(opts.args, stdin)
		if err != nil {
			fmt.Fprintf(stderr, "gitops-status: %v\n", err)
			return 1
		}
		for _, obj := range objs {
			if err := out.emit(obj, ""); err != nil {
				fmt.Fprintf(stderr, "gitops-status: %v\n", err)
				return 1
			}
		}
		return out.exitCode(false)
	}

	live, err := newLiveSource(opts.kubeconfig, opts.gvk, opts.namespace)
	if err != nil {
		fmt.Fprintf(stderr, "gitops-status: %v\n", err)
		return 1
	}
	if opts.watch > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), opts.watch)
		defer cancel()
		opened := func() { fmt.Fprintf(stderr, "gitops-status: watching %s\n", opts.args[0]) }
		err := live.watch(ctx, opts.args[0], out.emit, out.reached, opened)
		if err != nil && !errors.Is(err, errUntilReached) {
			fmt.Fprintf(stderr, "gitops-status: %v\n", err)
			return 1
		}
		return out.exitCode(true)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, name := range opts.args {
		obj, err := live.get(ctx, name)
		if err != nil {
			fmt.Fprintf(stderr, "gitops-status: %v\n", err)
			return 1
		}
		if obj == nil {
			out.notFound(live.kind, opts.namespace, name, "")
			continue
		}
		if err := out.emit(obj, ""); err != nil {
			fmt.Fprintf(stderr, "gitops-status: %v\n", err)
			return 1
		}
	}
	return out.exitCode(false)
}

func parseFlags(argv []string, stderr io.Writer) (options, error) {
	var opts options
	fs := flag.NewFlagSet("gitops-status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&opts.lua, "lua", "", "also run this Argo CD health Lua on each object")
	fs.StringVar(&opts.kubeconfig, "kubeconfig", "", "read the named objects from this cluster")
	fs.StringVar(&opts.gvk, "gvk", "", "group/version/Kind of the live objects, e.g. finetune.dev/v1alpha1/FineTuneJob")
	fs.StringVar(&opts.namespace, "n", "", "namespace of the live objects")
	fs.DurationVar(&opts.watch, "watch", 0, "watch the one named object this long, one line per version")
	fs.StringVar(&opts.until, "until", "", "with -watch: stop once kstatus says this (or argocd:STATUS for Argo CD)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: gitops-status [-lua FILE] [FILE...]")
		fmt.Fprintln(stderr, "       gitops-status [-lua FILE] -kubeconfig K -gvk G/V/Kind [-n NS] [-watch D [-until S]] NAME...")
		fs.PrintDefaults()
	}
	if err := fs.Parse(argv); err != nil {
		return opts, err
	}
	opts.args = fs.Args()
	bad := func(msg string) (options, error) {
		fmt.Fprintln(stderr, "gitops-status: "+msg)
		fs.Usage()
		return opts, errors.New(msg)
	}
	if opts.kubeconfig != "" {
		if opts.gvk == "" || len(opts.args) == 0 {
			return bad("-kubeconfig needs -gvk and at least one object name")
		}
		if opts.watch > 0 && len(opts.args) != 1 {
			return bad("-watch takes exactly one object name")
		}
	} else if opts.watch > 0 || opts.gvk != "" || opts.namespace != "" {
		return bad("-watch, -gvk and -n need -kubeconfig")
	}
	if opts.until != "" && opts.watch == 0 {
		return bad("-until needs -watch")
	}
	return opts, nil
}

var errUntilReached = errors.New("-until reached")

type printer struct {
	enc     *json.Encoder
	script  string
	withLua bool
	until   string
	luaErr  bool
	matched bool
}

// emit classifies obj and prints its line; it returns errUntilReached once -until matched.
func (p *printer) emit(obj *unstructured.Unstructured, event string) error {
	line := Line{
		Kind:            obj.GetKind(),
		Namespace:       obj.GetNamespace(),
		Name:            obj.GetName(),
		Generation:      obj.GetGeneration(),
		ResourceVersion: obj.GetResourceVersion(),
		Event:           event,
	}
	if observed, found, err := unstructured.NestedInt64(obj.Object, "status", "observedGeneration"); err == nil && found {
		line.Observed = &observed
	}
	if event != "" {
		line.Seen = time.Now().UTC().Format(time.RFC3339Nano)
	}
	if event == "DELETED" {
		line.Kstatus = Verdict{Status: status.NotFoundStatus.String(), Message: "Resource not found"}
	} else if res, err := status.Compute(obj); err != nil {
		line.Kstatus = Verdict{Error: err.Error()}
	} else {
		line.Kstatus = Verdict{Status: res.Status.String(), Message: res.Message}
	}
	if p.withLua && event != "DELETED" {
		hs, err := argoResourceHealth(obj, p.script)
		if err != nil {
			p.luaErr = true
			line.ArgoCD = &Verdict{Error: err.Error()}
		} else {
			line.ArgoCD = &Verdict{Status: hs.Status, Message: hs.Message}
		}
	}
	if err := p.enc.Encode(line); err != nil {
		return err
	}
	if p.until != "" && p.matches(line) {
		p.matched = true
		return errUntilReached
	}
	return nil
}

func (p *printer) matches(line Line) bool {
	if want, ok := strings.CutPrefix(p.until, "argocd:"); ok {
		return line.ArgoCD != nil && line.ArgoCD.Status == want
	}
	return line.Kstatus.Status == p.until
}

func (p *printer) reached() bool { return p.matched }

func (p *printer) notFound(kind, namespace, name, event string) {
	_ = p.enc.Encode(Line{
		Kind: kind, Namespace: namespace, Name: name, Event: event,
		Kstatus: Verdict{Status: status.NotFoundStatus.String(), Message: "Resource not found"},
	})
}

func (p *printer) exitCode(watched bool) int {
	switch {
	case p.luaErr:
		return 2
	case watched && p.until != "" && !p.matched:
		return 3
	}
	return 0
}
