/*
 * normexport RMSNorm TensorRT plugin: IPluginV3 (IPluginV3OneCore / OneBuild / OneRuntime) around the CUDA kernel of
 * rmsnorm_kernel.cu. See rmsnorm_plugin.h for the node it implements and how the library registers it.
 */
#include "rmsnorm_plugin.h"

#include "rmsnorm_kernel.h"

#include <cmath>
#include <cstdio>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#if NV_TENSORRT_MAJOR < 10
#error "The normexport RMSNorm plugin implements IPluginV3, which needs TensorRT 10 or newer."
#endif

using namespace nvinfer1;

namespace
{

constexpr char const* kPluginName = NORMEXPORT_RMSNORM_PLUGIN_NAME;
constexpr char const* kPluginVersion = NORMEXPORT_RMSNORM_PLUGIN_VERSION;
constexpr float kDefaultEpsilon = 1e-5F; // ONNX RMSNormalization's default

std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder = nullptr; // set by TensorRT through setLoggerFinder()
ILogger* gLogger = nullptr;             // set through initLibNormexportRmsnormPlugin()

void logMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        std::string const text = std::string("[normexport RMSNorm] ") + message;
        ILogger* logger = nullptr;
        {
            std::lock_guard<std::mutex> lock(gLoggerMutex);
            if (gLoggerFinder != nullptr)
            {
                logger = gLoggerFinder->findLogger();
            }
            if (logger == nullptr)
            {
                logger = gLogger;
            }
        }
        if (logger != nullptr)
        {
            logger->log(severity, text.c_str());
        }
        else if (severity == ILogger::Severity::kERROR || severity == ILogger::Severity::kINTERNAL_ERROR)
        {
            std::fprintf(stderr, "%s\n", text.c_str());
        }
    }
    catch (...)
    {
    }
}

void logError(std::string const& message) noexcept
{
    logMessage(ILogger::Severity::kERROR, message);
}

int kernelDtype(DataType type)
{
    switch (type)
    {
    case DataType::kFLOAT: return NORMEXPORT_RMSNORM_FLOAT32;
    case DataType::kHALF: return NORMEXPORT_RMSNORM_FLOAT16;
    case DataType::kBF16: return NORMEXPORT_RMSNORM_BFLOAT16;
    default: return -1;
    }
}

int64_t volume(Dims const& dims)
{
    int64_t v = 1;
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        v *= dims.d[i];
    }
    return v;
}

bool fullyKnown(Dims const& dims)
{
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        if (dims.d[i] < 0)
        {
            return false;
        }
    }
    return dims.nbDims >= 0;
}

class RMSNormPlugin final : public IPluginV3,
                            public IPluginV3OneCore,
                            public IPluginV3OneBuild,
                            public IPluginV3OneRuntime
{
public:
    RMSNormPlugin(std::string pluginNamespace, float epsilon, bool hasResidual, bool hasBias)
        : mNamespace(std::move(pluginNamespace))
        , mEpsilon(epsilon)
        , mHasResidual(hasResidual ? 1 : 0)
        , mHasBias(hasBias ? 1 : 0)
    {
        std::ostringstream id;
        id << "epsilon=" << mEpsilon << ";has_residual=" << mHasResidual << ";has_bias=" << mHasBias;
        mDescription = id.str();
    }

    RMSNormPlugin(RMSNormPlugin const& other)
        : RMSNormPlugin(other.mNamespace, other.mEpsilon, other.mHasResidual != 0, other.mHasBias != 0)
    {
    }
    RMSNormPlugin& operator=(RMSNormPlugin const&) = delete;
    ~RMSNormPlugin() override = default;

    // IPluginV3 ------------------------------------------------------------------------------------------------------
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) RMSNormPlugin(*this);
    }

    // IPluginV3OneCore -----------------------------------------------------------------------------------------------
    AsciiChar const* getPluginName() const noexcept override
    {
        return kPluginName;
    }
    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }
    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return mNamespace.c_str();
    }

    // IPluginV3OneBuild ----------------------------------------------------------------------------------------------
    int32_t getNbOutputs() const noexcept override
    {
        return mHasResidual ? 2 : 1;
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/,
        int32_t nbOutputs) noexcept override
    {
        if (!checkCounts(nbInputs, nbOutputs))
        {
            return -1;
        }
        Dims const& x = in[0].desc.dims;
        if (x.nbDims < 1)
        {
            logError("x must have at least one dimension (the normalized one)");
            return -1;
        }
        int64_t const hidden = x.d[x.nbDims - 1];
        for (int32_t index : {1, biasIndex()})
        {
            if (index < 0)
            {
                continue;
            }
            Dims const& p = in[index].desc.dims;
            if (hidden >= 0 && fullyKnown(p) && volume(p) != hidden)
            {
                logError(std::string(index == 1 ? "gamma" : "bias") + " has " + std::to_string(volume(p))
                    + " elements, the last dimension of x has " + std::to_string(hidden));
                return -1;
            }
        }
        if (mHasResidual)
        {
            Dims const& r = in[2].desc.dims;
            bool same = r.nbDims == x.nbDims;
            for (int32_t i = 0; same && i < x.nbDims; ++i)
            {
                same = x.d[i] < 0 || r.d[i] < 0 || x.d[i] == r.d[i];
            }
            if (!same)
            {
                logError("residual must have the shape of x");
                return -1;
            }
        }
        return 0;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (!checkCounts(nbInputs, nbOutputs))
        {
            return -1;
        }
        for (int32_t i = 0; i < nbOutputs; ++i)
        {
            outputTypes[i] = inputTypes[0];
        }
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
        int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept override
    {
        if (!checkCounts(nbInputs, nbOutputs))
        {
            return -1;
        }
        if (inputs[0].nbDims < 1)
        {
            logError("x must have at least one dimension (the normalized one)");
            return -1;
        }
        for (int32_t i = 0; i < nbOutputs; ++i)
        {
            outputs[i] = inputs[0];
        }
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (!checkCounts(nbInputs, nbOutputs) || pos < 0 || pos >= nbInputs + nbOutputs)
        {
            return false;
        }
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        if (pos == 0)
        {
            return kernelDtype(desc.type) >= 0;
        }
        return desc.type == inOut[0].desc.type;
    }

    char const* getTimingCacheID() noexcept override
    {
        return mDescription.c_str();
    }

    char const* getMetadataString() noexcept override
    {
        return mDescription.c_str();
    }

    // IPluginV3OneRuntime --------------------------------------------------------------------------------------------
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/,
        int32_t nbOutputs) noexcept override
    {
        if (!checkCounts(nbInputs, nbOutputs))
        {
            return -1;
        }
        Dims const& x = in[0].dims;
        if (x.nbDims < 1 || volume(in[1].dims) != x.d[x.nbDims - 1])
        {
            logError("gamma must have as many elements as the last dimension of x");
            return -1;
        }
        if (mHasBias && volume(in[biasIndex()].dims) != x.d[x.nbDims - 1])
        {
            logError("bias must have as many elements as the last dimension of x");
            return -1;
        }
        if (mHasResidual && volume(in[2].dims) != volume(x))
        {
            logError("residual must have the shape of x");
            return -1;
        }
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
        void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept override
    {
        Dims const& x = inputDesc[0].dims;
        if (x.nbDims < 1)
        {
            return cudaErrorInvalidValue;
        }
        int64_t const hidden = x.d[x.nbDims - 1];
        int64_t const rows = hidden > 0 ? volume(x) / hidden : 0;
        int const dtype = kernelDtype(inputDesc[0].type);
        int const status = normexport_rmsnorm_forward(dtype, inputs[0], mHasResidual ? inputs[2] : nullptr,
            inputs[1], mHasBias ? inputs[biasIndex()] : nullptr, outputs[0], mHasResidual ? outputs[1] : nullptr, rows,
            hidden, mEpsilon, stream);
        if (status != 0)
        {
            logError(std::string("kernel launch failed: ") + normexport_rmsnorm_error_string(status));
        }
        return status;
    }

    IPluginV3* attachToContext(IPluginResourceContext* /*context*/) noexcept override
    {
        return clone();
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mSerializedFields.clear();
        mSerializedFields.emplace_back("epsilon", &mEpsilon, PluginFieldType::kFLOAT32, 1);
        mSerializedFields.emplace_back("has_residual", &mHasResidual, PluginFieldType::kINT32, 1);
        mSerializedFields.emplace_back("has_bias", &mHasBias, PluginFieldType::kINT32, 1);
        mSerializedFieldCollection.nbFields = static_cast<int32_t>(mSerializedFields.size());
        mSerializedFieldCollection.fields = mSerializedFields.data();
        return &mSerializedFieldCollection;
    }

private:
    int32_t expectedInputs() const
    {
        return 2 + mHasResidual + mHasBias;
    }

    int32_t biasIndex() const
    {
        return mHasBias ? 2 + mHasResidual : -1;
    }

    bool checkCounts(int32_t nbInputs, int32_t nbOutputs) const noexcept
    {
        if (nbInputs != expectedInputs() || nbOutputs != getNbOutputs())
        {
            logError("expected " + std::to_string(expectedInputs()) + " inputs (x, gamma"
                + (mHasResidual ? ", residual" : "") + (mHasBias ? ", bias" : "") + ") and "
                + std::to_string(getNbOutputs()) + " outputs, got " + std::to_string(nbInputs) + " and "
                + std::to_string(nbOutputs) + " (check the has_residual and has_bias attributes)");
            return false;
        }
        return true;
    }

    std::string mNamespace;
    float mEpsilon;
    int32_t mHasResidual;
    int32_t mHasBias;
    std::string mDescription;
    std::vector<PluginField> mSerializedFields;
    PluginFieldCollection mSerializedFieldCollection{};
};

bool readFloat(PluginField const& field, float& value)
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    switch (field.type)
    {
    case PluginFieldType::kFLOAT32: value = *static_cast<float const*>(field.data); return true;
    case PluginFieldType::kFLOAT64: value = static_cast<float>(*static_cast<double const*>(field.data)); return true;
    default: return false;
    }
}

bool readInt(PluginField const& field, int64_t& value)
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    switch (field.type)
    {
    case PluginFieldType::kINT8: value = *static_cast<int8_t const*>(field.data); return true;
    case PluginFieldType::kINT16: value = *static_cast<int16_t const*>(field.data); return true;
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(field.data); return true;
    case PluginFieldType::kINT64: value = *static_cast<int64_t const*>(field.data); return true;
    default: return false;
    }
}

class RMSNormPluginCreator final : public IPluginCreatorV3One
{
public:
    explicit RMSNormPluginCreator(std::string pluginNamespace = "")
        : mNamespace(std::move(pluginNamespace))
    {
        mFields.emplace_back("epsilon", nullptr, PluginFieldType::kFLOAT32, 1);
        mFields.emplace_back("has_residual", nullptr, PluginFieldType::kINT32, 1);
        mFields.emplace_back("has_bias", nullptr, PluginFieldType::kINT32, 1);
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
    }

    AsciiChar const* getPluginName() const noexcept override
    {
        return kPluginName;
    }
    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }
    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return mNamespace.c_str();
    }

    PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mFieldCollection;
    }

    IPluginV3* createPlugin(AsciiChar const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept override
    {
        try
        {
            float epsilon = kDefaultEpsilon;
            int64_t hasResidual = 0;
            int64_t hasBias = 0;
            for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
            {
                PluginField const& field = fc->fields[i];
                std::string const name = field.name != nullptr ? field.name : "";
                bool ok = true;
                if (name == "epsilon")
                {
                    ok = readFloat(field, epsilon);
                }
                else if (name == "has_residual")
                {
                    ok = readInt(field, hasResidual);
                }
                else if (name == "has_bias")
                {
                    ok = readInt(field, hasBias);
                }
                else
                {
                    logMessage(ILogger::Severity::kVERBOSE, "ignoring field " + name);
                }
                if (!ok)
                {
                    logError("field " + name + " has an unsupported type or no data");
                    return nullptr;
                }
            }
            if (!std::isfinite(epsilon) || epsilon < 0.F)
            {
                logError("epsilon must be finite and >= 0, got " + std::to_string(epsilon));
                return nullptr;
            }
            if ((hasResidual != 0 && hasResidual != 1) || (hasBias != 0 && hasBias != 1))
            {
                logError("has_residual and has_bias must be 0 or 1");
                return nullptr;
            }
            return new RMSNormPlugin(mNamespace, epsilon, hasResidual == 1, hasBias == 1);
        }
        catch (std::exception const& e)
        {
            logError(std::string("createPlugin failed: ") + e.what());
        }
        catch (...)
        {
            logError("createPlugin failed");
        }
        return nullptr;
    }

private:
    std::string mNamespace;
    std::vector<PluginField> mFields;
    PluginFieldCollection mFieldCollection{};
};

RMSNormPluginCreator& defaultCreator()
{
    static RMSNormPluginCreator creator;
    return creator;
}

std::mutex gRegistrationMutex;

} // namespace

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static IPluginCreatorInterface* const kCreators[] = {&defaultCreator()};
    nbCreators = 1;
    return kCreators;
}

extern "C" void setLoggerFinder(ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    gLoggerFinder = finder;
}

extern "C" bool initLibNormexportRmsnormPlugin(void* logger, char const* libNamespace)
{
    try
    {
        if (logger != nullptr)
        {
            std::lock_guard<std::mutex> lock(gLoggerMutex);
            gLogger = static_cast<ILogger*>(logger);
        }
        std::string const ns = libNamespace != nullptr ? libNamespace : "";
        std::lock_guard<std::mutex> lock(gRegistrationMutex);
        IPluginRegistry* registry = getPluginRegistry();
        if (registry == nullptr)
        {
            return false;
        }
        if (registry->getCreator(kPluginName, kPluginVersion, ns.c_str()) != nullptr)
        {
            return true; // already registered: by an earlier call, by loadLibrary() or by static registration
        }
        IPluginCreatorInterface* creator = &defaultCreator();
        if (!ns.empty())
        {
            // One creator per namespace; they live until the process exits, like the registry that holds them.
            static std::vector<std::unique_ptr<RMSNormPluginCreator>> namespacedCreators;
            namespacedCreators.push_back(std::make_unique<RMSNormPluginCreator>(ns));
            creator = namespacedCreators.back().get();
        }
        return registry->registerCreator(*creator, ns.c_str());
    }
    catch (...)
    {
        return false;
    }
}

#if defined(NORMEXPORT_RMSNORM_STATIC_REGISTRATION) && NORMEXPORT_RMSNORM_STATIC_REGISTRATION
namespace
{
struct StaticRegistration
{
    StaticRegistration()
    {
        initLibNormexportRmsnormPlugin(nullptr, "");
    }
};
StaticRegistration const gStaticRegistration;
} // namespace
#endif
