package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
)

// liveSource reads objects of one kind from the API server.
type liveSource struct {
	kind     string
	resource dynamic.ResourceInterface
}

func newLiveSource(kubeconfig, gvkText, namespace string) (*liveSource, error) {
	parts := strings.Split(gvkText, "/")
	var gvk schema.GroupVersionKind
	switch len(parts) {
	case 2: // core group: v1/Pod
		gvk = schema.GroupVersionKind{Version: parts[0], Kind: parts[1]}
	case 3:
		gvk = schema.GroupVersionKind{Group: parts[0], Version: parts[1], Kind: parts[2]}
	default:
		return nil, fmt.Errorf("-gvk %q: want group/version/Kind (or version/Kind for the core group)", gvkText)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	cfg.Timeout = 30 * time.Second
	disco, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(disco))
	mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return nil, fmt.Errorf("-gvk %s: %w", gvkText, err)
	}
	// Watches outlive a request timeout: a client without one, each call bounded by its context.
	cfg.Timeout = 0
	client, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	var resource dynamic.ResourceInterface = client.Resource(mapping.Resource)
	if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
		if namespace == "" {
			namespace = "default"
		}
		resource = client.Resource(mapping.Resource).Namespace(namespace)
	}
	return &liveSource{kind: gvk.Kind, resource: resource}, nil
}

// get returns the object, or nil when it does not exist.
func (s *liveSource) get(ctx context.Context, name string) (*unstructured.Unstructured, error) {
	obj, err := s.resource.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	return obj, err
}

// watch calls emit for every version of the named object until ctx ends (nil) or emit
// returns an error (returned). It starts with the current version (if the object exists)
// and resumes after a closed or expired watch. `opened` is called once the first watch is open.
func (s *liveSource) watch(
	ctx context.Context, name string, emit func(*unstructured.Unstructured, string) error, done func() bool,
	opened func(),
) error {
	selector := fields.OneTermEqualSelector("metadata.name", name).String()
	resourceVersion := ""
	for ctx.Err() == nil && !done() {
		w, err := s.resource.Watch(ctx, metav1.ListOptions{FieldSelector: selector, ResourceVersion: resourceVersion})
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if apierrors.IsResourceExpired(err) || apierrors.IsGone(err) {
				resourceVersion = ""
				continue
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(200 * time.Millisecond):
			}
			continue
		}
		if opened != nil {
			opened()
			opened = nil
		}
		err = s.drain(ctx, w, emit, &resourceVersion)
		w.Stop()
		if err != nil {
			return err
		}
	}
	return nil
}

func (s *liveSource) drain(
	ctx context.Context, w watch.Interface, emit func(*unstructured.Unstructured, string) error, resourceVersion *string,
) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.ResultChan():
			if !ok {
				return nil
			}
			switch ev.Type {
			case watch.Added, watch.Modified, watch.Deleted:
				obj, ok := ev.Object.(*unstructured.Unstructured)
				if !ok {
					return fmt.Errorf("watch event %s carries a %T", ev.Type, ev.Object)
				}
				*resourceVersion = obj.GetResourceVersion()
				if err := emit(obj, string(ev.Type)); err != nil {
					return err
				}
			case watch.Error:
				status := apierrors.FromObject(ev.Object)
				var apiErr apierrors.APIStatus
				if errors.As(status, &apiErr) && apiErr.Status().Code == http.StatusGone {
					*resourceVersion = ""
				}
				return nil
			}
		}
	}
}
